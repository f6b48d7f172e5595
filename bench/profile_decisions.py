"""Where the decision time goes: the live processors in memory, without Kafka or Faust.

Drives the real ``detections.live`` processors through :class:`Processors` below (dict stores, one
FIFO per internal partition, no runner: the tests' ``LiveSim`` runs the worker's runner, one cycle
per record, which would be measured instead) with the same workload as ``decisions_throughput.py`` (facts first,
then every call, stage 2 drained after each call), then moves the clock past every deadline, a
few calls at a time, so each call is finalized (its final evidence version and the detection
rules), and finally past every call's sequence hold (``sequence_slack``), so the sequence rules see
every call too. Stage 2 writes its sequence records once per batch, as the worker does (a batch: one
call through stage 2, or one clock step of finals), and the cyclic GC runs at the worker's threshold
(``--gc-gen0``). Outputs are counted and dropped as they come, as the worker sends them on. Times it
without a profiler in CPU time (the machine is shared: best of ``--repeat``), then the same work one stage
at a time for the split into stage 1 (``Stage1.on_call``), stage 2 (``Stage2.on_message``, the
provisional verdict) and finalization (``Stage2.advance`` at the deadline, rules included), with
the share of the rules (``Detector``) on its own; then again under cProfile and prints the top
functions. This is the upper bound of one core running the job's code with no Kafka, Faust or
Avro; the Avro decode of a call and the encode of its evidence are timed on their own.

Usage: ``.venv/bin/python bench/profile_decisions.py [--calls 20000] [--top 12] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import benchkit as bk
from decisions_throughput import build_workload

from detections.catalog import Detector
from detections.live import LiveConfig, LiveCounters, Output, Stage1, Stage2, tick_message
from schemas import GrantIssued, GrantRevoked, SessionBound, SessionEnded, ToolCall, decode, delegation_key, encode
from schemas.avro_writer import fast_encode
from schemas.topics import partition_for
from stream_jobs.call_reader import call_reader
from stream_jobs.worker import GC_GEN0

_cpu = time.process_time


class Processors:
    """Both stages' processors over dict stores, forwards through one FIFO per partition: the
    decision code alone (what the worker's runner and Kafka add is measured by decisions_throughput.py)."""

    def __init__(self, partitions: int) -> None:
        self.n = partitions
        self.config = LiveConfig()
        counters = LiveCounters()
        s1_sessions: dict[str, bytes] = {}
        s1_calls: dict[str, bytes] = {}
        s2_grants: dict[str, bytes] = {}
        s2_calls: dict[str, bytes] = {}
        s2_seq: dict[str, bytes] = {}
        self.stage1 = [Stage1(p, s1_sessions, s1_calls, self.config, counters) for p in range(partitions)]
        self.stage2 = [
            Stage2(p, s2_grants, s2_calls, self.config, counters, sequence=s2_seq, deferred=True)
            for p in range(partitions)
        ]
        self.queues: list[deque[tuple[str, bytes]]] = [deque() for _ in range(partitions)]
        self.evidence: list[Any] = []
        self.findings: list[Any] = []

    def _partition(self, key: str) -> int:
        return partition_for(key.encode("utf-8"), self.n)

    def _collect(self, out: Output) -> None:
        self.evidence.extend(out.evidence)
        self.findings.extend(out.findings)
        for fwd in out.forwards:
            self.queues[self._partition(fwd.route)].append((fwd.route, fwd.payload))

    def deliver(self, event: Any, now: datetime) -> None:
        if isinstance(event, ToolCall):
            self._collect(self.stage1[self._partition(event.session_id)].on_call(event, now))
        elif isinstance(event, (SessionBound, SessionEnded)):
            self._collect(self.stage1[self._partition(event.session_id)].on_fact(event, now))
        elif isinstance(event, (GrantIssued, GrantRevoked)):
            key = delegation_key(event.tenant, event.principal, event.agent_id)
            self._collect(self.stage2[self._partition(key)].on_fact(event, now))

    def step(self, now: datetime) -> bool:
        for p, queue in enumerate(self.queues):
            if queue:
                route, payload = queue.popleft()
                self._collect(self.stage2[p].on_message(route, payload, now))
                return True
        return False

    def flush(self) -> None:
        """The end of a worker batch: the sequence records written (the stages are deferred)."""
        for s2 in self.stage2:
            s2.flush()

    def drain(self, now: datetime) -> None:
        while self.step(now):
            pass
        self.flush()

    def tick(self, now: datetime) -> None:
        for s2 in self.stage2:
            self._collect(s2.on_message("", tick_message(), now))
        self.drain(now)


LiveSim = Processors  # the name the functions below were written with


class Timings:
    """CPU seconds spent per part of one phased drive, and in the rules (perf_counter)."""

    def __init__(self) -> None:
        self.stage1 = self.stage2 = self.final = self.detector = 0.0

    @property
    def total(self) -> float:
        return self.stage1 + self.stage2 + self.final


STEP = timedelta(microseconds=50)
"""Between two calls on the injected clock (all 20,000 calls arrive within one second)."""
FINAL_BATCH = 32
"""Calls whose deadline passes per clock step at the end (a worker finalizes a few per event)."""


class Sink:
    """What the worker does with the processors' outputs: send them on and forget them. LiveSim
    keeps every output; holding 40,000 evidence records would only measure the garbage collector."""

    def __init__(self) -> None:
        self.evidence = self.findings = 0

    def take(self, sim: LiveSim) -> None:
        self.evidence += len(sim.evidence)
        self.findings += len(sim.findings)
        sim.evidence.clear()
        sim.findings.clear()


def finalize(sim: LiveSim, n: int, now: datetime, sink: Sink) -> None:
    """Move the clock past each call's deadline (arrival + grace), ``FINAL_BATCH`` calls at a time."""
    grace = sim.config.grace
    for i in range(FINAL_BATCH - 1, n + FINAL_BATCH - 1, FINAL_BATCH):
        sim.tick(now + grace + STEP * i)
        sink.take(sim)
    sim.tick(now + grace + sim.config.sequence_slack + STEP * (n + 1))  # the last holds over
    sink.take(sim)


def drive(sim: LiveSim, calls: list[ToolCall], now: datetime, sink: Sink) -> None:
    """Every call through both stages (stage 2 drained after each), then every deadline passed."""
    for i, call in enumerate(calls):
        t = now + STEP * i
        sim.deliver(call, t)
        sim.drain(t)
        sink.take(sim)
    finalize(sim, len(calls), now, sink)


def phased(sim: LiveSim, calls: list[ToolCall], now: datetime, sink: Sink, timings: Timings) -> None:
    """The same work one stage at a time, so that each is timed with one clock read: every call
    through stage 1, then stage 2 drains the internal topic, then every deadline passes."""
    t0 = _cpu()
    for i, call in enumerate(calls):
        sim.deliver(call, now + STEP * i)
    t1 = _cpu()
    end = now + STEP * len(calls)
    while sim.step(end):
        sink.take(sim)
    sim.flush()
    t2 = _cpu()
    finalize(sim, len(calls), now, sink)
    t3 = _cpu()
    timings.stage1, timings.stage2, timings.final = t1 - t0, t2 - t1, t3 - t2


def fresh(facts: list[Any], now: datetime, partitions: int) -> LiveSim:
    sim = LiveSim(partitions)
    for fact in facts:
        sim.deliver(fact, now)
    return sim


def time_detector(timings: Timings) -> Callable[[], None]:
    """Count the time spent in the rules (``Detector.evaluate*``); returns the undo."""
    saved = {name: getattr(Detector, name) for name in ("evaluate", "evaluate_with") if hasattr(Detector, name)}
    depth = [0]

    def timed(method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    timings.detector += time.perf_counter() - t0

        return wrapper

    for name, method in saved.items():
        setattr(Detector, name, timed(method))

    def undo() -> None:
        for name, method in saved.items():
            setattr(Detector, name, method)

    return undo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--delegations", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3, help="timed drives; the fastest counts (shared machine)")
    parser.add_argument(
        "--gc-gen0", type=int, default=GC_GEN0, help=f"gc.set_threshold(N, 20, 20); the worker's: {GC_GEN0}; 0: as is"
    )
    parser.add_argument("--final-top", type=int, default=25, help="top functions of finalization alone (cProfile)")
    args = parser.parse_args()
    if args.gc_gen0:
        gc.set_threshold(args.gc_gen0, 20, 20)
    wl = build_workload(args.calls, args.sessions, args.delegations, seed=7)
    values = [value for _, value in wl.calls]
    read_call = call_reader()
    decode_us = read_us = float("inf")
    for _ in range(max(1, args.repeat)):  # both ways, alternating (shared machine): the fastest of each counts
        t0 = _cpu()
        calls = [decode(value) for value in values]
        decode_us = min(decode_us, (_cpu() - t0) / len(calls) * 1e6)
        t0 = _cpu()
        for value in values:
            read_call(value)
        read_us = min(read_us, (_cpu() - t0) / len(values) * 1e6)
    assert all(isinstance(c, ToolCall) for c in calls)
    now = datetime.now(UTC)
    n = len(calls)

    best_cpu = best_wall = float("inf")
    for _ in range(max(1, args.repeat)):
        sim = fresh(wl.facts, now, args.partitions)
        sink = Sink()
        w0, c0 = time.perf_counter(), _cpu()
        drive(sim, calls, now, sink)  # type: ignore[arg-type]
        best_cpu = min(best_cpu, _cpu() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)

    split: Timings | None = None
    for _ in range(max(1, args.repeat)):
        timings = Timings()
        undo = time_detector(timings)
        try:
            phased(fresh(wl.facts, now, args.partitions), calls, now, Sink(), timings)  # type: ignore[arg-type]
        finally:
            undo()
        if split is None or timings.total < split.total:
            split = timings
    assert split is not None
    us = 1e6 / n
    live_us = best_cpu * us

    # Untimed: every call got a final verdict; the Avro encode of some evidence records.
    sim = fresh(wl.facts, now, args.partitions)
    for i, call in enumerate(calls):
        sim.deliver(call, now + STEP * i)
    sim.drain(now + STEP * n)
    sim.tick(now + sim.config.grace + sim.config.sequence_slack + STEP * n)
    finals = sum(1 for e in sim.evidence if e.final)
    assert finals == n, f"{finals} final verdicts for {n} calls"
    assert not any(s2.held_calls() for s2 in sim.stage2), "every final call went through the sequence rules"
    sample = sim.evidence[:: max(1, len(sim.evidence) // 4000)]
    encode_us = fast_us = float("inf")
    for _ in range(max(1, args.repeat)):
        t0 = _cpu()
        for evidence in sample:
            encode(evidence)
        encode_us = min(encode_us, (_cpu() - t0) / len(sample) * 1e6)
        t0 = _cpu()
        for evidence in sample:
            fast_encode(evidence)
        fast_us = min(fast_us, (_cpu() - t0) / len(sample) * 1e6)
    del sim, sample

    print(f"machine: {bk.machine()}; gc threshold {gc.get_threshold()}")
    print(f"code: {bk.code_fingerprint()}")
    print(
        f"{n:,} calls, {args.sessions:,} sessions, {args.delegations:,} delegations x 2 grants; load {bk.load_text()}"
    )
    print(
        f"  all of it, per call (CPU time, best of {args.repeat}; wall {best_wall * us:.1f} µs): {live_us:7.1f} µs/call"
    )
    print(f"    stage 1 (Stage1.on_call):                            {split.stage1 * us:7.1f} µs/call")
    print(f"    stage 2 (Stage2.on_message, provisional verdict):    {split.stage2 * us:7.1f} µs/call")
    print(f"    finalization (Stage2.advance at the deadline):       {split.final * us:7.1f} µs/call")
    print(f"      of which the rules (Detector, wall clock):         {split.detector * us:7.1f} µs/call")
    print(f"  Avro decode + validation of a call (schemas.decode):   {decode_us:7.1f} µs/call")
    print(
        f"    the worker's stage 1 reader (call_reader: fast path {read_call.fast:,}, full {read_call.full:,}): "
        f"{read_us:7.1f} µs/call"
    )
    print(f"  Avro encode of an evidence record (schemas.encode):    {encode_us:7.1f} µs/record (2 per call)")
    print(f"    the worker's compiled writer (avro_writer.fast_encode): {fast_us:7.1f} µs/record")
    total_us = live_us + decode_us + 2 * encode_us
    print(
        f"  => one core, no Kafka or Faust: at most {1e6 / total_us:,.0f} calls/s with decode and encode, "
        f"{1e6 / (live_us + read_us + 2 * fast_us):,.0f} with the worker's reader and writer"
    )

    # Finalization alone under cProfile: every call through both stages first, unprofiled.
    sim = fresh(wl.facts, now, args.partitions)
    for i, call in enumerate(calls):
        sim.deliver(call, now + STEP * i)
    while sim.step(now + STEP * n):
        sim.evidence.clear()
    sim.flush()
    profile = cProfile.Profile()
    profile.enable()
    finalize(sim, n, now, Sink())
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).strip_dirs().sort_stats("cumulative").print_stats(args.final_top)
    text = out.getvalue()
    print(f"\n--- finalization alone: top {args.final_top} by cumulative (cProfile) ---")
    print(text[text.index("ncalls") :].rstrip())

    sim = fresh(wl.facts, now, args.partitions)
    profile = cProfile.Profile()
    profile.enable()
    drive(sim, calls, now, Sink())  # type: ignore[arg-type]
    profile.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.strip_dirs().sort_stats(order).print_stats(args.top)
        text = out.getvalue()
        print(f"\n--- top {args.top} by {order} (cProfile, same drive) ---")
        print(text[text.index("ncalls") :].rstrip())


if __name__ == "__main__":
    main()
