"""Latency from a tool call emitted to its provisional verdict visible in ClickHouse (issue 4).

Target: p99 <= 1 s at 5,000 calls/s. One run against the real stack on this machine: a local
Kafka broker (KRaft, 127.0.0.1, free ports, temp folder), the sink owning a fresh chDB folder
and one decision worker (``--workers N``: N in one group, their CPU and counters added up), started by
``Stack.up`` as ``scopewatch up`` starts them (4 partitions, ``sink_batch_seconds`` 0.2 unless told
otherwise, production grace and tick).

1. The identity and consent facts (``decisions_throughput.build_workload``: 2,000 sessions over
   500 delegations, two grants each) are published; the bench waits until the worker has them.
2. Calls are emitted at the offered rate for ``--seconds``: each is one of the workload's calls
   (80 % in scope, 20 % out of scope) with a fresh call id. The bench stands in for collectors on
   other hosts, so its own CPU should not be the stack's: by default (``--emit prebuilt``) every
   call is Avro-encoded *before* the timed run; call i's planned emit time is the run's start +
   i / rate, and at each 2 ms tick the calls due are handed to an idempotent librdkafka producer
   (confluent-kafka; acks=all, linger 20 ms) with their ``event_time`` bytes patched to that
   planned time (a fixed-width varint). Latency is measured from the planned time, so any delay of
   the bench itself counts against the stack. ``--emit batches``: the calls are made and encoded
   on the fly, ``event_time`` = the instant each is made, one aiokafka record batch per partition
   per tick; ``--emit messages``: one aiokafka ``send`` per call, as before 2026-12-05 evening.
   The bench's CPU per call is printed next to the worker's, the sink's and the broker's.
3. Per call, from ClickHouse afterwards (the sink's SQL endpoint): ``call_time`` (= emit, ms),
   ``decided_at`` of version 1 (the worker's clock when it decided) and ``_ingested_at`` of the
   version-1 row (the sink's clock when it took the message into a batch; the batch is inserted
   when it is full or ``sink_batch_seconds`` after its first message). ``_ingested_at - call_time``
   is a lower bound of the time to visible: it misses the rest of the batch's wait and its
   insert. So a poller also queries ClickHouse every ``--poll`` s for a sample of the calls
   (about 200 per second of offered load, their call ids marked by a prefix: one short query
   selects them by it, emitted since the oldest one not yet seen), and records the moment the
   answer came back with the call in it: an upper bound, coarse by up to one poll cycle.
   ``evidence_current`` is a plain view over ``evidence``, so a row is visible there exactly
   when it is visible in the table; after the run the bench checks that ``evidence_current``
   holds exactly one row per emitted call.
4. If latency grows during the run (the stack does not keep up with the offered rate), the
   bench says so and measures again on a fresh sink, worker and chDB folder (new topics and
   groups on the same broker) at 0.7 times the rate the stack got through (verdicts from the
   first emit to the last verdict, backlog included), up to ``--fallbacks`` times.

Everything runs on the same machine: the bench process (producer, poller), the broker, the
worker and the sink share its cores. CPU of the worker and the sink is sampled from /proc.

Usage: ``.venv/bin/python bench/verdict_latency.py [--rate 5000] [--seconds 25] ...``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit as bk
from decisions_throughput import build_workload

from schemas import ToolCall, decode
from scopewatch.sqlclient import SqlError
from scopewatch.stack.kafka import KafkaBroker
from stream_jobs.runtime.settings import Settings

CODE = (
    "stream_jobs/app.py",
    "stream_jobs/runner.py",
    "stream_jobs/worker.py",
    "stream_jobs/sink.py",
    "stream_jobs/rows.py",
    "detections/live",
    "schemas/codec.py",
)  # printed as sha256 prefixes: there is no commit to name

TARGET_P99_S = 1.0
TARGET_RATE = 5_000
TENANT = "acme"


# ------------------------------------------------------------------------- poller


@dataclass
class Poller:
    """Finds when sampled calls become visible in ClickHouse, through the sink's SQL endpoint."""

    settings: Settings
    interval: float
    marker: str = field(default_factory=lambda: f"poll{uuid.uuid4().hex[:8]}-")
    """Prefix of the sampled calls' ids (the poller's query selects them by it)."""
    outstanding: dict[str, float] = field(default_factory=dict)  # call_id -> emit time (epoch s)
    seen: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # id -> (emit, lower, upper)
    cycles: list[float] = field(default_factory=list)
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add(self, call_id: str, emitted: float) -> None:
        with self._lock:
            self.outstanding[call_id] = emitted

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def pending(self) -> int:
        with self._lock:
            return len(self.outstanding)

    def _run(self) -> None:
        # One short query per cycle, the same text each time but for its time bound: the sampled calls'
        # ids start with ``marker``, so the query needs no list of ids (an IN list of a few hundred ids,
        # parsed three times by the sink's SQL guard, cost the sink more CPU than its inserts).
        previous_sent = time.time()
        while not self._stop.is_set():
            with self._lock:
                oldest = min(self.outstanding.values(), default=None)
            if oldest is None:
                previous_sent = time.time()
                self._stop.wait(self.interval)
                continue
            where = (
                f"tenant = '{TENANT}' AND version = 1 AND startsWith(call_id, '{self.marker}') "
                f"AND {bk.window('call_time', oldest - 1)}"
            )
            sent = time.time()
            try:
                rows = bk.select(self.settings, "call_id", "evidence", where, 30)
            except (SqlError, OSError):
                self.errors += 1
                self._stop.wait(self.interval)
                continue
            back = time.time()
            self.cycles.append(back - sent)
            with self._lock:
                for (cid,) in rows:
                    emitted = self.outstanding.pop(cid, None)
                    if emitted is not None:
                        self.seen[cid] = (emitted, previous_sent, back)
            previous_sent = sent
            self._stop.wait(max(0.0, self.interval - (time.time() - sent)))


# ------------------------------------------------------------------------- emitting


@dataclass
class Emitted:
    started: float
    ended: float
    times: dict[str, float]  # call_id -> emit time (epoch seconds)
    late_ticks: int  # pacing ticks that ran more than 50 ms late (the bench process could not keep up)


async def emit_calls(
    bootstrap: str, topic: str, pool: list[ToolCall], rate: float, seconds: float, poller: Poller, batched: bool
) -> Emitted:
    """Calls of the pool at ``rate`` for ``seconds``, about 200 a second of them sampled for the poller."""
    sample_every = max(1, int(rate // 200))
    times: dict[str, float] = {}
    rng = random.Random(11)

    def make(i: int, now: float) -> ToolCall:
        template = pool[rng.randrange(len(pool))]
        if i % sample_every:
            call = bk.fresh_call(template, now)
        else:
            call = bk.fresh_call(template, now, call_id=f"{poller.marker}{uuid.uuid4()}")
            poller.add(call.call_id, now)
        times[call.call_id] = now
        return call

    paced = await bk.send_paced(bootstrap, topic, rate, int(rate * seconds), make, batched)
    return Emitted(paced.started, paced.ended, times, paced.late_ticks)


@dataclass
class Plan:
    """Every call of a run, encoded before it (``--emit prebuilt``): the timed run only sends."""

    call_ids: list[str]
    sampled: set[int]  # indices of the calls the poller looks for
    pre: bk.Prebuilt


def plan_calls(pool: list[ToolCall], rate: float, seconds: float, poller: Poller, partitions: int) -> Plan:
    """The calls ``emit_calls`` would make (same pool draw, same sampling), encoded now."""
    sample_every = max(1, int(rate // 200))
    rng = random.Random(11)
    calls, sampled = [], set()
    for i in range(int(rate * seconds)):
        template = pool[rng.randrange(len(pool))]
        if i % sample_every:
            calls.append(bk.fresh_call(template, bk.PLACEHOLDER_S))
        else:
            calls.append(bk.fresh_call(template, bk.PLACEHOLDER_S, call_id=f"{poller.marker}{uuid.uuid4()}"))
            sampled.add(i)
    return Plan([c.call_id for c in calls], sampled, bk.prebuild_calls(calls, partitions))


def emit_planned(bootstrap: str, topic: str, plan: Plan, rate: float, poller: Poller) -> Emitted:
    """Send a :class:`Plan` at ``rate``; each call's emit time is its planned one (``bk.send_prebuilt``)."""
    times: dict[str, float] = {}
    ids, sampled = plan.call_ids, plan.sampled

    def sent(i: int, planned: float) -> None:
        times[ids[i]] = planned
        if i in sampled:
            poller.add(ids[i], planned)

    paced = bk.send_prebuilt(bootstrap, topic, rate, plan.pre, sent)
    return Emitted(paced.started, paced.ended, times, paced.late_ticks)


# ------------------------------------------------------------------------- reading back


def fetch_versions(settings: Settings, since: float) -> dict[str, tuple[int, int, int]]:
    """call_id -> (call_time ms, decided_at ms, _ingested_at ms) of version 1, for calls since ``since``."""
    rows = bk.select_by_call(
        settings,
        "toUnixTimestamp64Milli(any(call_time)), toUnixTimestamp64Milli(min(decided_at)), "
        "toUnixTimestamp64Milli(min(_ingested_at))",
        "evidence",
        f"version = 1 AND {bk.window('call_time', since)}",
        pages=8,
    )
    return {cid: (int(ct), int(dec), int(ing)) for cid, ct, dec, ing in rows}


def current_check(settings: Settings, since: float) -> tuple[int, int, float]:
    """(rows, distinct calls) of ``evidence_current`` for calls since ``since``, and the query's seconds."""
    t0 = time.perf_counter()
    row = bk.select(settings, "count(), uniqExact(call_id)", "evidence_current", bk.window("call_time", since))[0]
    return int(row[0]), int(row[1]), time.perf_counter() - t0


def decided_count(settings: Settings, since: float) -> int:
    where = f"version = 1 AND {bk.window('call_time', since)}"
    return int(bk.select(settings, "uniqExact(call_id)", "evidence", where, timeout=120)[0][0])


def dump_calls(
    prefix: str, pids: dict[str, int], emitted: Emitted, versions: dict[str, tuple[int, int, int]], poller: Poller
) -> None:
    """``--dump``: every call's emit time and version-1 times, the sampled calls' poll bounds, the pids
    (``bench/latency_timeline.py`` lines them up with the jobs' ``SCOPEWATCH_TRACE_DIR`` lines)."""
    path = Path(f"{prefix}.{int(emitted.started)}.json")
    calls = [(emit, *versions[cid][1:]) for cid, emit in emitted.times.items() if cid in versions]
    data = {
        "pids": pids,
        "started": emitted.started,
        "ended": emitted.ended,
        "calls": calls,  # (emit s, decided_at ms, _ingested_at ms)
        "polled": [(emit, lower, upper) for emit, lower, upper in poller.seen.values()],
    }
    path.write_text(json.dumps(data))
    bk.say(f"per-call times written to {path}")


@dataclass
class RunResult:
    rate: float
    seconds: float
    emitted: int
    decided: int
    late_ticks: int
    emit_rate: float
    ingested: list[float]  # _ingested_at - emit (s), per call
    decided_lat: list[float]  # decided_at - emit
    sink_lat: list[float]  # _ingested_at - decided_at
    polled: list[float]  # visible-by (upper bound) - emit, sampled
    polled_lower: list[float]
    poll_cycle: float
    poll_errors: int
    sustained: bool
    trend: tuple[float, float]  # median latency of the first and last tenth of the calls
    decided_rate: float
    throughput: float  # version-1 verdicts ingested per second, first emit -> last ingested (backlog included)
    drain_cpu: dict[str, float]
    current_rows: int
    current_calls: int
    current_seconds: float
    cpu: dict[str, float]
    busy: float
    load: str
    drain_seconds: float
    dead_letters: int
    per_call: dict[str, float] = field(default_factory=dict)
    label: str = ""  # "baseline": the stack ran the code of --baseline


# ------------------------------------------------------------------------- where the CPU goes (paced)


def job_stats(settings: Settings, pids: dict[str, int]) -> dict[str, float]:
    """The worker's and the sink's counters now (flattened numbers, prefixed ``worker.``/``sink.``)."""
    out: dict[str, float] = {}
    for worker_name in bk.worker_names(pids):  # several workers (--workers): their counters added up
        worker = bk.worker_stats(settings, pids[worker_name]) or {}
        for k, v in (worker.get("counters") or {}).items():
            if isinstance(v, int | float):
                out[f"worker.{k}"] = out.get(f"worker.{k}", 0) + v
        for topic, v in (worker.get("sent_to") or {}).items():  # messages per topic (changelogs by table)
            name = topic.removeprefix(settings.topic_prefix).replace(settings.worker_group + "-", "")
            out[f"worker.sent_to.{name}"] = out.get(f"worker.sent_to.{name}", 0) + v
    with contextlib.suppress(OSError, ValueError):
        sink = json.loads((settings.run_dir / "sink-stats.json").read_text())
        for k, v in sink.items():
            if isinstance(v, int | float):
                out[f"sink.{k}"] = v
    return out


def per_call_costs(
    s0: dict[str, Any], s1: dict[str, Any], a: dict[str, float], b: dict[str, float], calls: int
) -> dict[str, float]:
    """Over the emit window: CPU µs per call of worker and sink, and what each did per call / per second."""
    if not calls:
        return {}
    wall = s1["worker"].at - s0["worker"].at
    d = {k: b[k] - a.get(k, 0) for k in b}
    workers = bk.worker_names(s0)
    out = {
        "worker_us_per_call": sum(s1[w].proc - s0[w].proc for w in workers) / calls * 1e6,  # workers added up
        "sink_us_per_call": (s1["sink"].proc - s0["sink"].proc) / calls * 1e6,
        "broker_us_per_call": (s1["kafka"].proc - s0["kafka"].proc) / calls * 1e6 if "kafka" in s0 else 0.0,
        "bench_us_per_call": (s1["bench"].proc - s0["bench"].proc) / calls * 1e6,
        "window_s": wall,
    }
    for k, v in sorted(d.items()):
        if v and (k.endswith("batches") or k in ("worker.messages_sent", "sink.rows", "sink.bulk_rows")):
            out[k + "_per_s"] = v / wall if wall else 0.0
        if k.startswith("worker.sent_to.") or k in ("worker.messages_sent", "worker.produce_flushes"):
            out[k + "_per_call"] = v / calls
    return out


def start_spies(pids: dict[str, int], prefix: str, tag: str) -> list[subprocess.Popen[bytes]]:
    exe = str(Path(sys.executable).parent / "py-spy")
    spies = []
    for name in (*bk.worker_names(pids), "sink"):
        out = f"{prefix}.{name}.{tag}.txt"
        argv = [exe, "record", "--pid", str(pids[name]), "--rate", "200", "--format", "raw", "--nonblocking", "-o", out]
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def stop_spies(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(timeout=30)


def measure(
    pipe: bk.Pipeline,
    pool: list[ToolCall],
    rate: float,
    seconds: float,
    args: argparse.Namespace,
    drain: float | None = None,
) -> RunResult:
    settings, pids = pipe.settings, {**pipe.pids, "bench": os.getpid()}
    poller = Poller(settings, args.poll)
    poller.start()
    batched = args.emit == "batches"
    plan = None
    if args.emit == "prebuilt":  # encoded before the CPU samples: the timed run only sends
        t_plan = time.perf_counter()
        plan = plan_calls(pool, rate, seconds, poller, settings.partitions)
        bk.say(f"{len(plan.call_ids):,} calls encoded in {time.perf_counter() - t_plan:.1f}s before the run")
    dead_before = bk.workers_dead_letters(settings, pids)
    stats0 = job_stats(settings, pids)
    spies = start_spies(pids, args.py_spy, f"{rate:.0f}") if args.py_spy and drain is None else []
    s0 = bk.sample_cpu(pids)
    load = bk.load_text()
    try:
        if plan is not None:
            emitted = emit_planned(settings.kafka_bootstrap, settings.topics.tool_calls, plan, rate, poller)
        else:
            emitted = asyncio.run(
                emit_calls(settings.kafka_bootstrap, settings.topics.tool_calls, pool, rate, seconds, poller, batched)
            )
        s1 = bk.sample_cpu(pids)
        stats1 = job_stats(settings, pids)
        stop_spies(spies)
        n = len(emitted.times)
        bk.say(
            f"emitted {n:,} calls in {emitted.ended - emitted.started:.2f}s "
            f"({n / (emitted.ended - emitted.started):,.0f}/s); waiting for their verdicts"
        )
        drain_start = time.time()
        deadline = time.monotonic() + (args.drain if drain is None else drain)
        decided = 0
        moved = time.monotonic()
        while time.monotonic() < deadline:
            count = decided_count(settings, emitted.started)
            if count != decided:
                decided, moved = count, time.monotonic()
            if decided >= n and poller.pending() == 0:
                break
            if time.monotonic() - moved > args.stall:
                bk.say(f"[red]no new verdict for {args.stall:.0f}s: the worker is stuck or skipped calls[/]")
                break
            time.sleep(1.0)
        drain_seconds = time.time() - emitted.ended
        s2 = bk.sample_cpu(pids)
        if decided < n:
            bk.say(
                f"[red]{n - decided:,} calls still without a verdict {time.time() - drain_start:.0f}s after the run[/]"
            )
            bk.diagnose(settings, pids["worker"])
    finally:
        poller.stop()
    versions = fetch_versions(settings, emitted.started)
    ingested, decided_lat, sink_lat = [], [], []
    order: list[tuple[float, float]] = []
    for cid, emit in emitted.times.items():
        v = versions.get(cid)
        if v is None:
            continue
        _ct, dec, ing = v
        ingested.append(ing / 1000 - emit)
        decided_lat.append(dec / 1000 - emit)
        sink_lat.append((ing - dec) / 1000)
        order.append((emit, ing / 1000 - emit))
    trend = bk.tenths(order)
    # Throughput: what the stack got through, backlog included: from the first emit to the last version-1 row
    # ingested. Decided rate: version-1 rows ingested per second over the run's window.
    throughput, decided_rate = bk.verdict_rates(order, emitted.started, emitted.ended)
    rows, calls, cur_s = current_check(settings, emitted.started)
    if args.dump and drain is None:
        dump_calls(args.dump, pids, emitted, versions, poller)
    polled = [upper - emit for emit, _lower, upper in poller.seen.values()]
    polled_lower = [lower - emit for emit, lower, _upper in poller.seen.values()]
    return RunResult(
        rate=rate,
        seconds=seconds,
        emitted=n,
        decided=len([c for c in emitted.times if c in versions]),
        late_ticks=emitted.late_ticks,
        emit_rate=n / (emitted.ended - emitted.started),
        ingested=ingested,
        decided_lat=decided_lat,
        sink_lat=sink_lat,
        polled=polled,
        polled_lower=polled_lower,
        poll_cycle=bk.percentile(poller.cycles, 50) if poller.cycles else float("nan"),
        poll_errors=poller.errors,
        sustained=len(versions) >= n and bk.kept_up(trend),
        trend=trend,
        decided_rate=decided_rate,
        throughput=throughput,
        drain_cpu=bk.workers_added(bk.cpu_shares(s1, s2)),
        current_rows=rows,
        current_calls=calls,
        current_seconds=cur_s,
        cpu=bk.workers_added(bk.cpu_shares(s0, s1)),
        busy=bk.busy_share(s0["worker"], s1["worker"]),
        load=load,
        drain_seconds=drain_seconds,
        dead_letters=bk.workers_dead_letters(settings, pids) - dead_before,
        per_call=per_call_costs(s0, s1, stats0, stats1, n),
    )


# ------------------------------------------------------------------------- report


def report(results: list[RunResult]) -> None:
    table = bk.new_table(
        "Call emitted -> provisional verdict visible in ClickHouse (evidence_current)",
        ("offered rate", "measure", "p50", "p99", "max", "target p99", "result"),
    )
    for r in results:
        label = f"{r.rate:,.0f}/s" + (f" {r.label}" if r.label else "") + ("" if r.sustained else " (not kept up)")
        rows = [
            ("visible (poll, upper bound), sampled", r.polled, True),
            ("_ingested_at - emit (lower bound), every call", r.ingested, False),
            ("  of which emit -> worker decided (decided_at)", r.decided_lat, False),
            ("  of which decided -> taken into a sink batch", r.sink_lat, False),
        ]
        for name, values, judged in rows:
            if not values:
                table.add_row(label, name, "-", "-", "-", "", "")
                continue
            p99 = bk.percentile(values, 99)
            table.add_row(
                label,
                name + f" (n={len(values):,})",
                bk.ms_p(values, 50),
                bk.ms(p99),
                bk.ms(max(values)),
                f"<= {TARGET_P99_S * 1000:.0f} ms" if judged else "",
                bk.mark(p99 <= TARGET_P99_S) if judged else "",
            )
            label = ""
    bk.console.print(table)
    extra = bk.RunsTable("The same runs, other views", results)
    row = extra.row
    row("calls emitted / with a version-1 verdict", lambda r: f"{r.emitted:,} / {r.decided:,}")
    row("emit rate achieved (bench producer)", lambda r: f"{r.emit_rate:,.0f}/s")
    row("pacing ticks > 50 ms late (bench process starved)", lambda r: str(r.late_ticks))
    row("verdicts ingested per second during the emit window", lambda r: f"{r.decided_rate:,.0f}/s")
    row("verdicts per second, first emit -> last verdict (backlog included)", lambda r: f"{r.throughput:,.0f}/s")
    row("median latency, first tenth -> last tenth of calls", lambda r: f"{bk.ms(r.trend[0])} -> {bk.ms(r.trend[1])}")
    row("kept up with the offered rate", lambda r: "yes" if r.sustained else "[red]no[/]")
    row(
        "visible (poll): lower bound p50 / p99",
        lambda r: f"{bk.ms_p(r.polled_lower, 50)} / {bk.ms_p(r.polled_lower, 99)}" if r.polled_lower else "-",
    )
    row("poll cycle (query round trip, median)", lambda r: bk.ms(r.poll_cycle))
    row("poll errors", lambda r: str(r.poll_errors))
    row("worker dead letters during the run", lambda r: str(r.dead_letters))
    row(
        "evidence_current rows / distinct calls (want = emitted)", lambda r: f"{r.current_rows:,} / {r.current_calls:,}"
    )
    row("evidence_current count query time", lambda r: f"{r.current_seconds:.2f} s")
    row("worker CPU (1 core = 100%)", lambda r: f"{r.cpu.get('worker', 0):.0%}")
    row("sink CPU (1 core = 100%)", lambda r: f"{r.cpu.get('sink', 0):.0%}")
    row("broker CPU (1 core = 100%)", lambda r: f"{r.cpu.get('kafka', 0):.0%}")
    row("bench process CPU: producer and poller (1 core = 100%)", lambda r: f"{r.cpu.get('bench', 0):.0%}")
    row("machine busy during emit (all cores = 100%)", lambda r: f"{r.busy:.0%}")
    row("drain after the emit window", lambda r: f"{r.drain_seconds:.1f} s")
    row(
        "worker / sink CPU during the drain (1 core = 100%)",
        lambda r: f"{r.drain_cpu.get('worker', 0):.0%} / {r.drain_cpu.get('sink', 0):.0%}",
    )
    row("load average at the start (1/5/15)", lambda r: r.load)
    row(
        "CPU per call while emitting: worker / sink / broker / bench (producer + poller)",
        lambda r: (
            " / ".join(f"{r.per_call.get(k + '_us_per_call', 0):,.0f}" for k in ("worker", "sink", "broker", "bench"))
            + " µs"
        ),
    )
    row(
        "per second while emitting: stage batches, messages sent, sink batches",
        lambda r: " / ".join(
            f"{r.per_call.get(k, 0):,.0f}"
            for k in (
                "worker.attribute_batches_per_s",
                "worker.authorize_batches_per_s",
                "worker.messages_sent_per_s",
                "sink.batches_per_s",
            )
        ),
    )
    row(
        "worker Kafka messages per emitted call while emitting, by topic (flushes per call)",
        lambda r: (
            ", ".join(
                f"{k.removeprefix('worker.sent_to.').removesuffix('_per_call')} {v:.2f}"
                for k, v in sorted(r.per_call.items())
                if k.startswith("worker.sent_to.") and k.endswith("_per_call")
            )
            + f"; all {r.per_call.get('worker.messages_sent_per_call', 0):.2f}"
            + f" ({r.per_call.get('worker.produce_flushes_per_call', 0):.4f})"
        ),
    )
    bk.console.print(extra.table)
    bk.say(f"load average at the end: {bk.load_text()}")


# ------------------------------------------------------------------------- main


def fresh_pipeline(args: argparse.Namespace, tmp: Path, broker: KafkaBroker, wl: Any) -> bk.Pipeline:
    """A new sink, worker and chDB folder on new topics and groups of the shared broker, facts decided."""
    run_id = uuid.uuid4().hex[:8]
    settings = bk.pipeline_settings(
        tmp, broker.config.bootstrap, run_id, args.partitions, args.grace, sink_batch_seconds=args.batch_seconds
    )
    return bk.start_pipeline(settings, broker, wl.facts, run_id, workers=args.workers)


def run(args: argparse.Namespace) -> int:
    bk.announce(CODE)
    with bk.temp_folder("scopewatch-bench-latency-", args.keep) as tmp, contextlib.ExitStack() as cleanup:
        broker = bk.local_broker(tmp, Settings().cache_dir)
        cleanup.callback(broker.stop)
        bk.say(f"Kafka broker ready on {broker.config.bootstrap}")
        wl = build_workload(args.pool, args.sessions, args.delegations, seed=7)
        pool = [c for c in (decode(v) for _, v in wl.calls) if isinstance(c, ToolCall)]

        def warm_up(pipe: bk.Pipeline, rate: float) -> bool:
            warm = min(rate, 500)
            bk.say(f"warming up at {warm:,.0f}/s for 3 s")
            w = measure(pipe, pool, warm, 3, args, drain=120)
            return w.decided == w.emitted

        baseline_runs: list[RunResult] = []

        def at_rate(rate: float) -> RunResult:
            # the same rate with the stack on the earlier code, right after (or, --baseline-first, right
            # before: the first run of a bench meets a freshly started broker JVM)
            if args.baseline and args.baseline_first:
                baseline_runs.append(at_rate_on(rate, args.baseline))
            r = at_rate_on(rate, None)
            if args.baseline and not args.baseline_first:
                baseline_runs.append(at_rate_on(rate, args.baseline))
            return r

        def at_rate_on(rate: float, code: str | None) -> RunResult:
            # Every rate gets its own sink, worker and chDB folder: the backlog of a run that did not keep up
            # (final versions, sink ingest) must not slow the next one down.
            with bk.code_from(code):  # Stack.up passes our environment to the sink and the worker
                r = measure_on(rate)
            r.label = "baseline" if code is not None else ""
            return r

        def measure_on(rate: float) -> RunResult:
            pipe = bk.warmed_pipeline(
                lambda: fresh_pipeline(args, tmp, broker, wl),
                lambda p: warm_up(p, rate),
                failed="the warm-up calls were not all decided",
                gave_up="three fresh pipelines in a row did not decide their warm-up calls",
            )
            try:
                load = bk.quiet_load(args)
                bk.say(f"measuring at {rate:,.0f} calls/s for {args.seconds:.0f}s (load {load})")
                r = measure(pipe, pool, rate, args.seconds, args)
            finally:
                pipe.stack.down()
            bk.say(
                f"{rate:,.0f}/s: visible p50 {bk.ms_p(r.polled, 50)} p99 {bk.ms_p(r.polled, 99)}; "
                f"ingested p50 {bk.ms_p(r.ingested, 50)} p99 {bk.ms_p(r.ingested, 99)}; "
                f"{'kept up' if r.sustained else 'did NOT keep up'} (got through {r.throughput:,.0f}/s)"
            )
            return r

        report(bk.measure_rates(args.rate, args.fallbacks, at_rate) + baseline_runs)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="offered calls/s (default 5,000)")
    parser.add_argument("--seconds", type=float, default=25.0, help="emit window per rate (default 25)")
    parser.add_argument("--fallbacks", type=int, default=3, help="lower rates to try when the stack does not keep up")
    parser.add_argument("--batch-seconds", type=float, default=0.2, help="SCOPEWATCH_SINK_BATCH_SECONDS (default 0.2)")
    parser.add_argument("--grace", type=float, default=15.0, help="worker grace seconds (default 15, as production)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="decision workers in one group, as `scopewatch up --workers N` (default 1); CPU and counters added up",
    )
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--delegations", type=int, default=500)
    parser.add_argument("--pool", type=int, default=5_000, help="distinct call templates")
    parser.add_argument("--poll", type=float, default=0.1, help="poll interval of the visibility check (s)")
    parser.add_argument("--drain", type=float, default=900, help="seconds to wait for the backlog after a run")
    parser.add_argument("--stall", type=float, default=60, help="stop waiting when no verdict came for this long")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="measure each rate again with the sink and worker on the code in DIR (`git archive REV | tar -x -C DIR`)",
    )
    parser.add_argument(
        "--baseline-first",
        action="store_true",
        help="with --baseline: measure the earlier code first at each rate (the first run meets a fresh broker)",
    )
    parser.add_argument(
        "--emit",
        choices=["prebuilt", "batches", "messages"],
        default="prebuilt",
        help="the bench's producer: every call encoded before the run and handed to librdkafka on its planned"
        " time, event time = planned emit time (default; nearly free); a record batch per partition every 2 ms"
        " tick, calls made and encoded on the fly (aiokafka); or one aiokafka send per call",
    )
    parser.add_argument(
        "--dump",
        metavar="PREFIX",
        help="write each measured run's per-call times to PREFIX.<start>.json (bench/latency_timeline.py)",
    )
    parser.add_argument(
        "--py-spy", metavar="PREFIX", help="sample worker and sink with py-spy while emitting (raw stacks)"
    )
    bk.add_common_options(parser)
    bk.exit_with(run, parser.parse_args())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
