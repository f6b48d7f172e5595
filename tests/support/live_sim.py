"""The live decision protocol over n partitions on the real runner, without a broker.

:class:`LiveSim` runs the decision worker's own job -- :func:`stream_jobs.worker.build_worker`: the
:class:`~stream_jobs.worker.DecisionJob`, both :class:`~stream_jobs.decisions.StageRunner` s and their
wiring from :func:`stream_jobs.decisions.build_stages` -- on the real :class:`stream_jobs.runner.Runner`
over the in-memory adapter: a :class:`~stream_jobs.runner.MemoryBroker` holds every topic (the
inputs, the internal ``calls-by-route`` topic, evidence, findings, dead letters, the changelogs) and
the group's committed offsets; :class:`~stream_jobs.runner.MemoryConsumer`,
:class:`~stream_jobs.state.MemoryChangelogReader` and :class:`~stream_jobs.decisions.MemoryPolicyFeed`
read it. Events are encoded and appended to their topic as a collector would; every step is one
runner cycle (take -> process -> flush -> commit) over one record, so the tests choose the
interleaving (hypothesis draws it). Used by the property tests of live = replay and some benches.

* :meth:`deliver`: the event is appended to its input topic and its partition is processed up to it
  (stage 1, or stage 2 for grants and approvals). A policy goes to ``consent.policies``, read by the
  worker's policy feed at its next tick (run at once).
* :meth:`step` / :meth:`drain`: records of the internal topic, one cycle each; :meth:`tick`: the
  runner's timer cycle (stage 2's clock), then :meth:`drain`.
* :attr:`evidence` / :attr:`findings`: everything the worker produced to those topics, in order.
* :attr:`stage1` / :attr:`stage2`: the processors of the worker's partitions (loaded as the worker
  loads them: stage 2 on a tick); ``s1_calls`` etc.: the changelog topics, compacted, as mappings
  (a write is a record appended to the changelog).

Restarts are the real worker's: a new runner and job over the same broker, which read the policies
from the beginning and each partition's state from its changelogs when first used (stage 2 then
re-checks the partition's calls: ``Stage2.recheck``), and take the inputs from the committed offsets.

* :meth:`rebuild`: a restart (nothing lost: every cycle was flushed and committed) and its first
  timer cycle (stage 2's partitions loaded);
* :meth:`commit` / :meth:`crash`: :meth:`crash` puts the broker back as it was at the last
  :meth:`commit` -- what the worker wrote since (outputs, forwards, changelogs) is gone and its input
  offsets are uncommitted, as if all of it had been one batch whose flush never completed -- and
  restarts. The records after the committed offsets are read again; the caller may deliver the same
  events again, which then are not appended twice (they are the records read again).
* ``kill_at={k: f}``: the k-th non-empty flush (from 0) lands the first fraction f of its messages
  and the process dies there (:class:`Killed`, SIGKILL in the middle of a flush); the sim restarts
  the worker and goes on, and the restarted worker takes the uncommitted records again. This is the
  path that loses a verdict if the runner commits before its flush is acknowledged.

``deferred=False`` gives stage 2 a sequence store written on each event instead of once per batch
(the worker's ``deferred_stage2``); both end up in the changelog at the end of each cycle.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from detections.live import LiveConfig, LiveCounters, Output, Stage1, Stage2
from detections.policy import PolicyStore
from schemas import BaseEvent, Evidence, Finding, decode, encode, key_for
from schemas.topics import partition_for, topic_for
from stream_jobs.decisions import MemoryPolicyFeed
from stream_jobs.runner import TP, MemoryBroker, MemoryConsumer, MemoryProducer, Message, Runner
from stream_jobs.runtime.settings import Settings
from stream_jobs.state import MemoryChangelogReader
from stream_jobs.worker import DecisionJob, build_worker

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
GROUP = "sim-decisions"
_LOOP = asyncio.new_event_loop()
"""One loop for every sim (the API is synchronous; a loop per sim would only be more to close)."""


class Killed(BaseException):
    """The worker process dies here: raised by a flush, not caught by the runner (SIGKILL)."""


@cache
def _settings(partitions: int) -> Settings:
    return Settings(
        home=Path("/tmp/scopewatch-livesim"), topic_prefix="sim.", partitions=partitions, worker_group=GROUP
    )


class _Producer(MemoryProducer):
    """The broker's producer, which also keeps what reached the evidence and findings topics."""

    def __init__(self, sim: LiveSim) -> None:
        super().__init__(sim.broker)
        self.sim = sim

    async def send_all(self, out: Sequence[Message]) -> dict[TP, int]:
        sim = self.sim
        if not out:
            return await super().send_all(out)
        k, sim.flushes = sim.flushes, sim.flushes + 1
        fraction = sim.kill_at.get(k)
        if fraction is not None:
            landed = list(out[: int(fraction * len(out))])
            await super().send_all(landed)
            sim._landed(landed)
            raise Killed(f"killed in flush {k} after {len(landed)} of {len(out)} messages")
        ends = await super().send_all(out)
        sim._landed(out)
        return ends


class _StoreView(MutableMapping[str, bytes]):
    """One state table as its changelog topic holds it (compacted, every partition)."""

    def __init__(self, sim: LiveSim, table: str) -> None:
        self.sim = sim
        self.table = table
        self._cache: tuple[Any, dict[str, tuple[int, bytes]]] | None = None

    def _state(self) -> dict[str, tuple[int, bytes]]:
        sim = self.sim
        topic = sim.changelogs[self.table]
        logs = [sim.broker.logs.get((topic, p), []) for p in range(sim.n)]
        stamp = (sim.generation, tuple(map(len, logs)))
        if self._cache is not None and self._cache[0] == stamp:
            return self._cache[1]
        state: dict[str, tuple[int, bytes]] = {}
        for p, records in enumerate(logs):
            for r in records:
                key = (r.key or b"").decode("utf-8")
                if r.value is None:
                    state.pop(key, None)
                else:
                    state[key] = (p, r.value)
        self._cache = (stamp, state)
        return state

    def __getitem__(self, key: str) -> bytes:
        return self._state()[key][1]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._state()))

    def __len__(self) -> int:
        return len(self._state())

    def __setitem__(self, key: str, value: bytes) -> None:
        """A record appended to the changelog (in the key's partition, else partition 0)."""
        p = self._state().get(key, (0, b""))[0]
        self.sim.broker.append(self.sim.changelogs[self.table], key.encode("utf-8"), value, p)

    def __delitem__(self, key: str) -> None:
        p = self._state()[key][0]
        self.sim.broker.append(self.sim.changelogs[self.table], key.encode("utf-8"), None, p)


class LiveSim:
    def __init__(
        self,
        partitions: int = 4,
        config: LiveConfig | None = None,
        *,
        deferred: bool = False,
        kill_at: Mapping[int, float] | None = None,
        allow_dead_letters: bool = False,
    ) -> None:
        self.n = partitions
        self.config = config or LiveConfig()
        self.deferred = deferred
        self.counters = LiveCounters()
        """The processors' counters, kept across restarts."""
        self.settings = _settings(partitions)
        topics = self.settings.topics
        self.inputs = [topics.tool_calls, topics.sessions, topics.calls_by_route, topics.grants, topics.approvals]
        self.produced = {topics.tool_calls, topics.sessions, topics.grants, topics.approvals, topics.policies}
        """The topics the sim writes as collectors do (never undone by :meth:`crash`)."""
        self.broker = MemoryBroker(partitions)
        self.evidence: list[Evidence] = []
        self.findings: list[Finding] = []
        self.dead_letters: list[Any] = []
        self.allow_dead_letters = allow_dead_letters
        self.kill_at = dict(kill_at or {})
        self.flushes = 0
        self.kills = 0
        self.restarts = 0
        self.generation = 0
        """Bumped when :meth:`crash` rewrites the broker's logs."""
        self._now: datetime | None = None
        self._committed: dict[str, Any] | None = None
        self._again: dict[TP, deque[tuple[int, bytes | None]]] = {}
        self.s1_sessions = _StoreView(self, "s1-sessions")
        self.s1_calls = _StoreView(self, "s1-calls")
        self.s2_grants = _StoreView(self, "s2-grants")
        self.s2_calls = _StoreView(self, "s2-calls")
        self.s2_seq = _StoreView(self, "s2-seq")
        self.s2_approvals = _StoreView(self, "s2-approvals")
        self._start()

    # -- the worker

    def _start(self) -> None:
        """A worker process: a new runner and job over the broker, assigned every partition."""
        topics = self.settings.topics
        self.consumer = MemoryConsumer(self.broker, GROUP, self.inputs)
        feed = MemoryPolicyFeed(self.broker, topics.policies, Counter())
        runner, job, stats, ready = build_worker(
            self.settings,
            self.consumer,
            _Producer(self),
            MemoryChangelogReader(self.broker),
            policies=feed,
            live_counters=self.counters,
            config=self.config,
        )
        stats.path = None
        runner.config.max_records = 1  # the test draws the interleaving: one record per cycle
        runner.config.batch_ms = 0
        runner.clock = self._clock
        job.assignor.last_counts = dict.fromkeys(self.inputs, self.n)  # what the group leader sends
        self.changelogs: dict[str, str] = runner.changelogs  # type: ignore[attr-defined]
        if not self.deferred:
            config, counters = self.config, self.counters

            def make(p: int, s: dict[str, Any]) -> Stage2:
                return Stage2(
                    p,
                    s["s2-grants"],
                    s["s2-calls"],
                    config,
                    counters,
                    sequence=s["s2-seq"],
                    approvals=s["s2-approvals"],
                    policies=feed.store,
                )

            job.stage2.make = make
        self.runner: Runner[Message] = runner
        self.job: DecisionJob = job
        self.feed = feed
        ready.set()
        _LOOP.run_until_complete(self.consumer.start(runner))

    def _restart(self) -> None:
        self.restarts += 1
        self._start()

    def _clock(self) -> datetime:
        return self._now or EPOCH

    def _landed(self, out: Sequence[Message]) -> None:
        topics = self.settings.topics
        for topic, _key, value, _p in out:
            if topic == topics.evidence:
                ev = decode(value or b"")
                assert isinstance(ev, Evidence)
                self.evidence.append(ev)
            elif topic == topics.findings:
                f = decode(value or b"")
                assert isinstance(f, Finding)
                self.findings.append(f)
            elif topic == topics.dead_letter:
                self.dead_letters.append(decode(value or b""))

    def _guarded(self, fn: Any, again: bool) -> None:
        """Run one coroutine of the worker; if it was killed, restart it (and run it ``again``)."""
        while True:
            try:
                _LOOP.run_until_complete(fn())
            except Killed:
                self.kills += 1
                self._restart()
                if again:
                    continue
            break
        if self.dead_letters and not self.allow_dead_letters:
            raise AssertionError(f"dead-lettered: {self.dead_letters}")

    def _cycle(self, tp: TP | None, timer: bool = False) -> None:
        """One runner cycle: take (at most one record, of ``tp`` only), process, flush, commit."""

        async def one() -> None:
            runner, consumer = self.runner, self.consumer
            batch: Mapping[TP, Sequence[Any]] = {}
            if tp is not None:
                others = consumer.assignment() - {tp}
                consumer.pause(others)
                try:
                    batch = await runner.take()
                finally:
                    consumer.resume(others)
            await runner.cycle(batch, timer)

        self._guarded(one, again=tp is None)

    def _through(self, tp: TP, offset: int) -> None:
        """Cycles on ``tp`` until its record at ``offset`` is processed (and what came before it)."""
        for _ in range(10_000):
            if self.consumer.positions.get(tp, 0) > offset:
                return
            self._cycle(tp)
        raise AssertionError(f"{tp}@{offset} was never processed")

    def flush(self) -> None:
        """What the stages emitted outside a cycle is flushed (:meth:`Runner.flush_pending`)."""
        self._guarded(self.runner.flush_pending, again=False)

    # -- the tests' API

    def partition(self, key: str) -> int:
        return partition_for(key.encode("utf-8"), self.n)

    def deliver(self, event: BaseEvent, now: datetime) -> None:
        """An event is appended to its input topic and its partition processed up to it."""
        self._now = now
        topics = self.settings.topics
        topic = topic_for(event, topics)
        key = key_for(event).encode("utf-8")
        value = encode(event)
        if topic == topics.policies:  # every worker reads all of it, at its next tick or stage-2 batch
            self.broker.append(topic, key, value)
            self._cycle(None, timer=True)
            return
        tp = (topic, partition_for(key, self.n))
        if topic not in self.inputs:  # e.g. a tool result: no stage reads it
            self.broker.append(topic, key, value, tp[1])
            return
        again = self._again.get(tp)
        if again and again[0][1] == value:
            offset = again.popleft()[0]  # delivered again after a crash: the record is in the log already
        else:
            self._again.pop(tp, None)
            self.broker.append(topic, key, value, tp[1])
            offset = self.broker.end(tp) - 1
        self._through(tp, offset)

    def step(self, now: datetime, rng: Any = None) -> bool:
        """Process the next record of one internal partition with records left (a random one if ``rng``)."""
        self._now = now
        route = self.settings.topics.calls_by_route
        positions, broker = self.consumer.positions, self.broker
        ready = [p for p in range(self.n) if positions.get((route, p), 0) < broker.end((route, p))]
        if not ready:
            return False
        p = rng.choice(ready) if rng is not None else ready[0]
        tp = (route, p)
        self._through(tp, self.consumer.positions[tp])
        return True

    def drain(self, now: datetime, rng: Any = None) -> None:
        while self.step(now, rng):
            pass

    def tick(self, now: datetime) -> None:
        """The runner's timer cycle (every stage-2 partition's clock to ``now``), then :meth:`drain`.

        A worker holding finality after its assignment (a restart: ``stream_jobs.worker.CatchUp``)
        first reads what its inputs hold, as the real one goes on reading while it holds."""
        self._now = now
        for _ in range(100):
            restarts = self.restarts
            while self.job.catch_up is not None and self._catch_up():
                pass
            self._cycle(None, timer=True)
            if self.restarts == restarts:  # else the restarted worker holds: read, then tick again
                break
        self.drain(now)

    def _catch_up(self) -> bool:
        """Process every input partition up to its end (a restart may come in between): whether any
        record was left."""
        left = False
        for tp in sorted(self.consumer.assignment()):
            end = self.broker.end(tp)
            if self.consumer.positions.get(tp, 0) < end:
                left = True
                self._through(tp, end - 1)
        return left

    def _collect(self, out: Output) -> None:
        """Outputs of a processor called directly: sent as the worker sends its stages' outputs."""
        self.job.stage2.sender.emit(out)
        self.flush()

    @property
    def stage1(self) -> list[Stage1]:
        stage = self.job.stage1
        for p in range(self.n):
            if p not in stage.partitions:
                _LOOP.run_until_complete(stage.partition(p, self._clock()))
        return [stage.partitions[p].proc for p in range(self.n)]

    @property
    def stage2(self) -> list[Stage2]:
        """Stage 2's processors; partitions not loaded yet are loaded by a timer cycle, as the worker does."""
        stage = self.job.stage2
        if any(p not in stage.partitions for p in range(self.n)):
            self._cycle(None, timer=True)
        return [stage.partitions[p].proc for p in range(self.n)]

    @stage2.setter
    def stage2(self, procs: list[Stage2]) -> None:
        """Other processors for the loaded partitions (until the next restart)."""
        stage = self.job.stage2
        self.stage2  # noqa: B018 - loads every partition
        for p, proc in enumerate(procs):
            stage.partitions[p].proc = proc

    @property
    def policies(self) -> PolicyStore:
        return self.feed.store

    def latest(self) -> dict[str, Evidence]:
        """The highest version per call id."""
        best: dict[str, Evidence] = {}
        for e in self.evidence:
            if e.call_id not in best or e.version > best[e.call_id].version:
                best[e.call_id] = e
        return best

    def versions(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for e in self.evidence:
            out.setdefault(e.call_id, []).append(e.version)
        return out

    def rebuild(self) -> None:
        """A restart and the new worker's first timer cycle (which loads every stage-2 partition from
        its changelogs and re-checks its calls); nothing is lost."""
        self.flush()
        self._restart()
        self._cycle(None, timer=True)

    def commit(self) -> None:
        """A point :meth:`crash` goes back to: the broker's log ends and committed offsets."""
        self.flush()
        self._committed = {
            "ends": {tp: len(records) for tp, records in self.broker.logs.items()},
            "offsets": dict(self.broker.committed.get(GROUP, {})),
            "evidence": len(self.evidence),
            "findings": len(self.findings),
        }

    def crash(self) -> None:
        """The worker dies; what it wrote since the last :meth:`commit` never reached the broker and
        its offsets since were never committed. A new worker starts from there."""
        assert self._committed is not None, "commit() first"
        saved = self._committed
        for tp, records in self.broker.logs.items():
            if tp[0] not in self.produced:
                del records[saved["ends"].get(tp, 0) :]
        self.broker.committed[GROUP] = dict(saved["offsets"])
        del self.evidence[saved["evidence"] :]
        del self.findings[saved["findings"] :]
        self.generation += 1
        offsets = saved["offsets"]
        self._again = {
            tp: deque((r.offset, r.value) for r in records[offsets.get(tp, 0) :])
            for tp, records in self.broker.logs.items()
            if tp[0] in self.produced and tp[0] in self.inputs
        }
        self._restart()
