"""Where the decision time goes: the live processors in memory, without Kafka or Faust.

Drives the real ``detections.live`` processors through the tests' ``LiveSim`` (dict stores, one
FIFO per internal partition) with the same workload as ``decisions_throughput.py`` (facts first,
then every call, stage 2 drained after each call), times it without a profiler, then again under
cProfile and prints the top functions. This is the upper bound of one core running the job's code
with no Kafka, Faust or Avro; the Avro decode of a call and the encode of its evidence are timed
on their own.

Usage: ``.venv/bin/python bench/profile_decisions.py [--calls 20000] [--top 12]``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchlib import code_fingerprint, machine
from decisions_throughput import build_workload

from schemas import ToolCall, decode, encode
from support.live_sim import LiveSim


def drive(sim: LiveSim, calls: list[ToolCall], now: datetime) -> None:
    for i, call in enumerate(calls):
        t = now + timedelta(microseconds=50 * i)
        sim.deliver(call, t)
        sim.drain(t)


def fresh(facts: list, now: datetime, partitions: int) -> LiveSim:  # type: ignore[type-arg]
    sim = LiveSim(partitions=partitions)
    for fact in facts:
        sim.deliver(fact, now)
    return sim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--delegations", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    wl = build_workload(args.calls, args.sessions, args.delegations, seed=7)
    t0 = time.perf_counter()
    calls = [decode(value) for _, value in wl.calls]
    decode_us = (time.perf_counter() - t0) / len(calls) * 1e6
    assert all(isinstance(c, ToolCall) for c in calls)
    now = datetime.now(UTC)

    sim = fresh(wl.facts, now, args.partitions)
    t0 = time.perf_counter()
    drive(sim, calls, now)  # type: ignore[arg-type]
    live_us = (time.perf_counter() - t0) / len(calls) * 1e6
    t0 = time.perf_counter()
    for evidence in sim.evidence:
        encode(evidence)
    encode_us = (time.perf_counter() - t0) / len(sim.evidence) * 1e6

    print(f"machine: {machine()}")
    print(f"code: {code_fingerprint()}")
    print(f"{len(calls):,} calls, {args.sessions:,} sessions, {args.delegations:,} delegations x 2 grants")
    print(f"  stage 1 + stage 2 processors (LiveSim, no profiler): {live_us:7.1f} µs/call")
    print(f"  Avro decode + validation of a call (schemas.decode): {decode_us:7.1f} µs/call")
    print(f"  Avro encode of an evidence record (schemas.encode):  {encode_us:7.1f} µs/record")
    total = live_us + decode_us + encode_us
    print(f"  => one core, no Kafka or Faust: at most {1e6 / total:,.0f} calls/s")

    sim = fresh(wl.facts, now, args.partitions)
    profile = cProfile.Profile()
    profile.enable()
    drive(sim, calls, now)  # type: ignore[arg-type]
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
