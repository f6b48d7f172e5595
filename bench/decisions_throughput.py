"""Calls per second through both stages of the real decision job, next to a plain aiokafka passthrough.

One run, on this machine, against a real local Kafka broker (KRaft, 127.0.0.1, free ports, temp
folder) with the ClickHouse sink (embedded chDB) running as ``scopewatch up`` runs it:

1. Start the broker, create the topics (unique prefix), start the sink and a decision worker
   (``python -m scopewatch worker``, a subprocess with the settings in its environment).
2. Publish the identity and consent facts (``session_bound`` for every session, ``grant_issued``
   for every delegation) with ``scopewatch.publish``; wait until the worker's stats show them
   processed; stop the worker.
3. Pre-generate N validated ``ToolCall`` events, Avro-encode them with ``schemas.encode`` and
   produce them all to the tool-calls topic (one batched aiokafka producer, keyed by session_id).
   Wait until the sink has ingested them, so its backlog does not overlap either measurement.
4. **Passthrough** (the ceiling of a Python Kafka path): a fresh process consumes the tool-calls
   topic (new group, from the beginning) and produces every value unchanged to another topic;
   ``--passthrough-runs`` times (default 3, each short and so exposed to other load), the median
   run counts.
5. **Pipeline**: a fresh worker process (same consumer group as in step 2, so it recovers the fact
   tables from their changelogs) consumes the same pre-produced calls.

Timing uses Kafka record timestamps (CreateTime, set by each producer client at send on this
host), so the bench process reads nothing while a measurement runs:

* pipeline calls/s = N / (time of the N-th call's first evidence version - time the worker
  forwarded its first call from stage 1 to stage 2), N = the calls it decided (see ``--stall``).
  The window starts when the worker processes its first call, i.e. after process start-up, Faust
  boot, group join and changelog recovery, which are fixed costs, not throughput; the end-to-end
  figure from process spawn is printed too.
* passthrough msgs/s = N / (time of the N-th produced copy - time of the first produced copy),
  likewise with the figure from process spawn.

"First evidence version" = the earliest evidence record per call id (key): the provisional
verdict, or directly the final one when stage 2 reaches the call after its deadline (arrival at
stage 1 + grace), which is what happens to most calls of a backlog. Finals of provisional
verdicts are produced while later calls are processed, as in production.

If the worker stops making progress before deciding every call (``--stall`` seconds), the rates
are over the calls it did decide and the calls stage 1 never processed are listed by
partition@offset (seen at worker start on a backlog; faust-streaming#596). The worker CPU time is
sampled from /proc, so calls per CPU-second are printed too (steadier on a shared machine).

``--policy-share 0,0.1,1`` (issue 18) measures one pipeline per share, side by side: that fraction
of the delegations get grants naming a Cedar policy (:data:`POLICY`: a permit on the context and a
forbid on a ``restricted`` label), published to consent.policies with the facts; 2 % of the calls
read a restricted file. Every call's first verdict is checked against the workload (in_scope, or
out_of_policy for a restricted read under the policy), so a worker that fails closed or never
asks Cedar cannot pass unnoticed (exit 1).

Usage: ``.venv/bin/python bench/decisions_throughput.py [--calls 200000] [--no-sink] ...``
Everything started here (broker, sink, workers) is stopped at the end; the temp folder is removed
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.table import Table

from schemas import (
    Event,
    Evidence,
    GrantIssued,
    PolicyPublished,
    SessionBound,
    ToolCall,
    decode,
    encode,
    key_for,
)
from scopewatch.publish import publish_events
from scopewatch.stack import proc
from scopewatch.stack.kafka import KafkaBroker, create_topics
from scopewatch.stack.stack import Stack, settings_env
from stream_jobs.runtime.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk

TARGET_CALLS_PER_S = 20_000
TARGET_RATIO = 0.5
TARGET_PER_CPU = 6_000  # issue 16: calls per worker CPU-second, both stages, sink running
TENANT = "acme"
POLICY_ID = "data-access"
POLICY = """
permit(principal, action == Action::"call", resource)
when { context.attested && !context.labels.contains("personal") && context.hour >= 0 };
forbid(principal, action, resource) when { context.labels.contains("restricted") };
"""
"""The Cedar policy of ``--policy-share``: a permit on the request context (attested caller, no
personal data) and a forbid on resources labelled ``restricted`` (2 % of the calls read one)."""
POLICY_LABELS = {"restricted": ["file:/data/restricted/*"], "personal": ["file:/home/*"]}


# ------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    facts: list[Event]
    calls: list[tuple[bytes, bytes]]  # (key, Avro value)
    call_mix: Counter[str]
    avg_call_bytes: float
    expected: dict[str, str | None] = field(default_factory=dict)
    """call_id -> the verdict it must get (None: neither in_scope nor out_of_policy); --policy-share only."""
    policy_calls: int = 0  # calls of a delegation whose grants name the policy


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def build_workload(
    n_calls: int, n_sessions: int, n_delegations: int, seed: int, policy_share: float | None = None
) -> Workload:
    """Sessions bound round-robin to delegations, two grants per delegation, a realistic call mix.

    ``policy_share`` (0..1): that fraction of the delegations get grants naming :data:`POLICY`
    (published to consent.policies with the facts), and 2 % of the calls read a ``restricted``
    resource (out_of_policy under the policy, in_scope otherwise). The calls are the same for
    every share (same seed)."""
    rng = random.Random(seed)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    facts_at = base - timedelta(hours=1)
    delegations = [(f"user{d:05d}@example.com", f"mcp-client-{d % 20:02d}") for d in range(n_delegations)]
    facts: list[Event] = []
    with_policy: set[str] = set()
    if policy_share is not None:
        picked = random.Random(seed + 1).sample(range(n_delegations), round(n_delegations * policy_share))
        with_policy = {delegations[d][0] for d in picked}
        facts.append(
            PolicyPublished.model_validate(
                {
                    "event_id": str(uuid.UUID(int=random.Random(seed + 2).getrandbits(128), version=4)),
                    "event_time": facts_at - timedelta(days=1),
                    "tenant": TENANT,
                    "policy_id": POLICY_ID,
                    "version": "v1",
                    "cedar": POLICY,
                    "labels": POLICY_LABELS,
                    "published_by": "bench",
                }
            )
        )
    sessions: list[tuple[str, str, str]] = []
    for s in range(n_sessions):
        principal, agent = delegations[s % n_delegations]
        sid = _uid(rng)
        sessions.append((sid, principal, agent))
        facts.append(
            SessionBound.model_validate(
                {
                    "event_id": _uid(rng),
                    "event_time": facts_at,
                    "tenant": TENANT,
                    "session_id": sid,
                    "principal": principal,
                    "agent_id": agent,
                    "valid_from": facts_at,
                    "valid_until": None,
                    "auth": {"issuer": "https://idp.example.com", "method": "oauth2", "token_id": _uid(rng)},
                }
            )
        )
    for principal, agent in delegations:
        for tools, resources in ((["fs/read_*", "fs/list_*"], ["file:/data/*"]), (["github/*"], ["repo:acme/*"])):
            facts.append(
                GrantIssued.model_validate(
                    {
                        "event_id": _uid(rng),
                        "event_time": facts_at,
                        "tenant": TENANT,
                        "grant_id": _uid(rng),
                        "principal": principal,
                        "agent_id": agent,
                        "tools": tools,
                        "resources": resources,
                        "scopes": ["files:read"],
                        "not_before": facts_at,
                        "expires_at": facts_at + timedelta(days=30),
                        "granted_by": principal,
                        "purpose": "benchmark",
                        "parent_grant_id": None,
                        "policies": [POLICY_ID] if principal in with_policy else [],
                    }
                )
            )
    # 80% fs reads inside the grant, 10% github inside the grant, 5% a tool no grant names,
    # 5% a resource outside the grant.
    kinds = [
        ("in_scope/fs", "fs", "read_file", "file:/data/projects/{n}.txt", 80),
        ("in_scope/github", "github", "create_issue", "repo:acme/web", 10),
        ("out_of_scope_tool", "shell", "exec", None, 5),
        ("out_of_scope_resource", "fs", "read_file", "file:/etc/passwd", 5),
    ]
    if policy_share is not None:  # 2 % of the fs reads inside the grant read a restricted file
        kinds[0] = (*kinds[0][:4], 78)
        kinds.append(("restricted", "fs", "read_file", "file:/data/restricted/{n}.csv", 2))
    weights = [k[4] for k in kinds]
    seqs: Counter[str] = Counter()
    calls: list[tuple[bytes, bytes]] = []
    mix: Counter[str] = Counter()
    expected: dict[str, str | None] = {}
    policy_calls = 0
    size = 0
    for i in range(n_calls):
        sid, principal, agent = sessions[rng.randrange(n_sessions)]
        label, server, tool, resource, _ = rng.choices(kinds, weights)[0]
        mix[label] += 1
        resources = [] if resource is None else [resource.format(n=i % 1000)]
        collector = f"collector-{sid[:8]}"
        seq = seqs[collector]
        seqs[collector] += 1
        call = ToolCall.model_validate(
            {
                "event_id": _uid(rng),
                "event_time": base + timedelta(milliseconds=i // 10),
                "tenant": TENANT,
                "call_id": _uid(rng),
                "session_id": sid,
                "server": server,
                "tool": tool,
                "arguments": {"path": resources[0] if resources else "", "encoding": "utf-8"},
                "resources": resources,
                "transport": "stdio",
                "attested": {"sub": principal, "client_id": agent, "iss": "https://idp.example.com"},
                "claimed": {"user": principal},
                "tool_digest": "sha256:" + "ab" * 32,
                "collector": {"id": collector, "epoch": 1, "seq": seq, "prev_hash": "cd" * 32},
            }
        )
        value = encode(call)
        size += len(value)
        calls.append((key_for(call).encode("utf-8"), value))
        under = principal in with_policy
        policy_calls += under
        if label.startswith("in_scope"):
            expected[call.call_id] = "in_scope"
        elif label == "restricted":
            expected[call.call_id] = "out_of_policy" if under else "in_scope"
        else:
            expected[call.call_id] = None
    if policy_share is None:
        expected = {}
    return Workload(facts, calls, mix, size / max(1, n_calls), expected, policy_calls)


# ------------------------------------------------------------------------- kafka helpers


async def produce(bootstrap: str, topic: str, messages: Iterable[tuple[bytes, bytes]]) -> tuple[int, float]:
    """Produce batched (no send_and_wait per message); returns (count, seconds)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    started = time.perf_counter()
    futures = []
    try:
        for key, value in messages:
            futures.append(await producer.send(topic, value=value, key=key))
        await producer.flush()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(futures), time.perf_counter() - started


PARTITIONS = 4  # set from --partitions in run(): every topic of the run has that many


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


@dataclass(frozen=True)
class Rec:
    partition: int
    offset: int
    key: bytes | None
    ts: int  # record timestamp, ms
    value: bytes | None


async def read_records(bootstrap: str, topic: str, start: dict[int, int] | None = None) -> list[Rec]:
    """Every record of ``topic`` from ``start`` (default: the beginning) to the current end."""
    ends = await end_offsets(bootstrap, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=4 * 1024 * 1024
    )
    await consumer.start()
    out: list[Rec] = []
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        todo = set()
        for tp in tps:
            first = (start or {}).get(tp.partition, 0)
            consumer.seek(tp, first)
            if first < ends[tp.partition]:
                todo.add(tp)
        while todo:
            batches = await consumer.getmany(*todo, timeout_ms=1000, max_records=10_000)
            for tp, msgs in batches.items():
                for m in msgs:
                    if m.offset < ends[tp.partition]:
                        out.append(Rec(tp.partition, m.offset, m.key, m.timestamp, m.value))
                if msgs and msgs[-1].offset >= ends[tp.partition] - 1:
                    todo.discard(tp)
    finally:
        await consumer.stop()
    return out


async def group_lag(bootstrap: str, group: str, topic: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    ends = await end_offsets(bootstrap, topic)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    done = {tp.partition: om.offset for tp, om in committed.items() if tp.topic == topic}
    return sum(end - max(0, done.get(p, 0)) for p, end in ends.items())


# ------------------------------------------------------------------------- passthrough


async def passthrough(bootstrap: str, source: str, dest: str, group: str, n: int) -> None:
    """Consume ``source`` and produce every value unchanged to ``dest`` until n were copied."""
    consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    copied = 0
    futures = []
    try:
        while copied < n:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                for m in messages:
                    futures.append(await producer.send(dest, value=m.value, key=m.key, partition=m.partition))
                copied += len(messages)
        await producer.flush()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
        await consumer.stop()
    print(json.dumps({"copied": copied}))


def faust_passthrough(bootstrap: str, source: str, dest: str, group: str, n: int) -> None:
    """The same copy through a Faust agent built like the decision worker's: ``take_events`` batches,
    sent as per-partition record batches by an aiokafka producer, acks awaited before the next batch.
    This is the ceiling of the worker's Kafka path with zero decision work."""
    import faust

    app = faust.App(
        group,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        datadir=tempfile.mkdtemp(prefix="faust-pt-"),
    )
    topic = app.topic(source, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    copied = 0

    @app.task  # type: ignore[untyped-decorator]
    async def quiet() -> None:
        logging.getLogger("aiokafka").setLevel(logging.WARNING)

    @app.agent(topic, concurrency=1)
    async def copy(stream: Any) -> None:
        nonlocal copied
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=2, max_batch_size=1024 * 1024
        )
        await producer.start()
        async for events in stream.take_events(1000, within=0.02):
            groups: dict[int, list[Any]] = {}
            for event in events:
                groups.setdefault(event.message.partition, []).append(event.message)
            pending = []
            for part, messages in groups.items():
                batch = producer.create_batch()
                for m in messages:
                    if batch.append(key=m.key, value=m.value, timestamp=None) is None:
                        pending.append(await producer.send_batch(batch, dest, partition=part))
                        batch = producer.create_batch()
                        batch.append(key=m.key, value=m.value, timestamp=None)
                pending.append(await producer.send_batch(batch, dest, partition=part))
            await asyncio.gather(*pending)
            copied += len(events)
            if copied >= n:
                await producer.stop()
                print(json.dumps({"copied": copied}), flush=True)
                os._exit(0)  # a bench child: everything it produced is acknowledged

    from faust.worker import Worker

    Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


# ------------------------------------------------------------------------- processes


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: str | None = None) -> proc.PidRecord:
    """A child in its own process group (stopped by pid record, never by name)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        child = subprocess.Popen(argv, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.PidRecord.for_pid(child.pid, Path(argv[-1]).name, argv)


def summed_stats(settings: Settings, records: list[proc.PidRecord]) -> dict[str, Any] | None:
    """The workers' counters added up (``--workers`` > 1), or None while one has no stats file yet."""
    total: Counter[str] = Counter()
    each = []
    for record in records:
        stats = bk.worker_stats(settings, record.pid)
        if stats is None:
            return None
        counters = stats.get("counters", {})
        total.update({k: v for k, v in counters.items() if isinstance(v, int)})
        each.append(int(counters.get("stage2_calls", 0)))
    return {"counters": dict(total), "stage2_calls_each": each}


def wait_workers(
    settings: Settings,
    records: list[proc.PidRecord],
    n: int,
    timeout: float,
    stall: float,
    samples: list[bk.CpuSample],
) -> tuple[dict[str, Any], bool]:
    """As ``bk.wait_counters`` for several workers of one group: their ``stage2_calls`` added up reach ``n``.

    ``samples`` get the workers' CPU seconds added up (one sample of every worker per poll).
    """
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] | None = None
    last = -1
    moved = time.monotonic()
    while time.monotonic() < deadline:
        for record in records:
            if not proc.is_running(record):
                raise RuntimeError(f"worker pid {record.pid} exited; see its log under {settings.log_dir}")
        parts = [bk.cpu_times(record.pid) for record in records]
        samples.append(bk.CpuSample(parts[0].at, parts[0].busy, parts[0].total, sum(p.proc for p in parts)))
        stats = summed_stats(settings, records)
        done = int((stats or {}).get("counters", {}).get("stage2_calls", 0))
        if stats is not None and done >= n:
            return stats, True
        if done != last:
            last, moved = done, time.monotonic()
        elif stats is not None and done and time.monotonic() - moved > stall:
            return stats, False
        time.sleep(0.25)
    raise TimeoutError(f"workers did not decide {n} calls in {timeout:.0f}s; last stats: {stats}")


def worker_argv(profile: str | None = None) -> list[str]:
    if profile:
        return [sys.executable, "-m", "cProfile", "-o", str(Path(profile).resolve()), "-m", "scopewatch", "worker"]
    return [sys.executable, "-m", "scopewatch", "worker"]


# ------------------------------------------------------------------------- main


def interpolate(samples: list[bk.CpuSample], at: float) -> bk.CpuSample:
    """The CPU counters at wall time ``at``, linear between the two samples around it."""
    before = max((s for s in samples if s.at <= at), key=lambda s: s.at, default=samples[0])
    after = min((s for s in samples if s.at >= at), key=lambda s: s.at, default=samples[-1])
    if after.at <= before.at:
        return before
    f = (at - before.at) / (after.at - before.at)

    def mix(a: float, b: float) -> float:
        return a + (b - a) * f

    return bk.CpuSample(at, mix(before.busy, after.busy), mix(before.total, after.total), mix(before.proc, after.proc))


@dataclass(frozen=True)
class Window:
    """What one process used between two wall times: its CPU seconds and the machine's busy share."""

    seconds: float
    cpu: float  # CPU seconds of the process
    busy: float  # machine-wide busy share (all cores = 1.0)

    @classmethod
    def of(cls, samples: list[bk.CpuSample], start: float, end: float) -> Window:
        a, b = interpolate(samples, start), interpolate(samples, end)
        return cls(end - start, b.proc - a.proc, bk.busy_share(a, b))


def run_sampled(argv: list[str], timeout: float) -> tuple[subprocess.CompletedProcess[str], list[bk.CpuSample]]:
    """Run a child to completion, sampling its CPU time every 50 ms."""
    samples: list[bk.CpuSample] = []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(argv, stdout=out, stderr=err, text=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while child.poll() is None:
                try:
                    samples.append(bk.cpu_times(child.pid))
                except (OSError, IndexError, ValueError):
                    pass  # exiting
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{argv[1]} did not finish in {timeout:.0f}s")
                time.sleep(0.05)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, child.returncode, out.read(), err.read()), samples


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def run(args: argparse.Namespace) -> int:
    global PARTITIONS
    PARTITIONS = args.partitions
    tmp = Path(tempfile.mkdtemp(prefix="scopewatch-bench-"))
    run_id = uuid.uuid4().hex[:8]
    broker: KafkaBroker | None = None
    try:
        bk.announce()
        bk.say(f"temp folder {tmp}; building the workload ({args.calls:,} calls)")
        shares: list[float | None] = [None] if args.policy_share is None else list(args.policy_share)
        workloads: dict[float | None, Workload] = {}
        for share in shares:
            t0 = time.perf_counter()
            wl = workloads[share] = build_workload(args.calls, args.sessions, args.delegations, args.seed, share)
            bk.say(
                f"workload{'' if share is None else f' (policy share {share:.0%})'}: {len(wl.facts):,} facts, "
                f"{len(wl.calls):,} calls ({wl.avg_call_bytes:.0f} B Avro on average) in "
                f"{time.perf_counter() - t0:.1f}s; mix {dict(wl.call_mix)}"
                + ("" if share is None else f"; {wl.policy_calls:,} calls under a policy grant")
            )
        broker = bk.local_broker(tmp, Settings().cache_dir)
        bk.say(f"Kafka broker ready on {broker.config.bootstrap} (pid record {broker.pid_path})")
        results: dict[str, dict[str, Any]] = {}
        pt: PassthroughRun | None = None
        runs: list[tuple[str, str, str | None, float | None]] = []
        for share in shares:
            suffix = "" if share is None else f" {share:.0%} policy"
            runs += [(engine + suffix, engine, None, share) for engine in args.engines]
            if args.baseline:
                # the same engines on an earlier tree's code (the measured worker only), in the same run
                runs += [(f"{engine}@baseline{suffix}", engine, args.baseline, share) for engine in args.engines]
        for i, (label, engine, code, share) in enumerate(runs):
            # each run gets a pipeline of its own (topics, groups, changelogs, sink), one after the other
            results[label], pt = measure_engine(
                args, tmp, broker, f"{run_id}{i}{engine[:2]}", engine, workloads[share], pt, code, label
            )
        compare(args, results)
        wrong = sum(len(r["verdicts"]["wrong"]) for r in results.values() if r.get("verdicts"))
        return 1 if wrong else 0
    finally:
        if broker is not None:
            broker.stop()
        bk.remove_temp(tmp, args.keep)


def measure_engine(
    args: argparse.Namespace,
    tmp: Path,
    broker: KafkaBroker,
    run_id: str,
    engine: str,
    wl: Workload,
    pt_done: PassthroughRun | None,
    code: str | None = None,
    label: str | None = None,
) -> tuple[dict[str, Any], PassthroughRun]:
    """One engine's pipeline: facts, the pre-produced calls, (the passthroughs once), the measured worker."""
    bootstrap = broker.config.bootstrap
    stack: Stack | None = None
    measured: proc.PidRecord | None = None
    others: list[proc.PidRecord] = []  # --workers > 1: the measured worker's peers in its group
    facts_worker: proc.PidRecord | None = None
    try:
        settings = bk.pipeline_settings(tmp, bootstrap, run_id, args.partitions, args.grace, worker_engine=engine)
        topics = settings.topics
        passthrough_topics = [f"{settings.topic_prefix}bench.passthrough.{i}" for i in range(args.passthrough_runs)]
        faust_topic = f"{settings.topic_prefix}bench.faust-passthrough"
        asyncio.run(create_topics(bootstrap, [*topics.all(), *passthrough_topics, faust_topic], settings.partitions))
        bk.say(f"[bold]{label or engine}[/]: topics {settings.topic_prefix}*")

        # -- facts, through a worker (and the sink)
        if args.sink:
            stack = Stack(settings, report=lambda m: bk.say(f"stack: {m}"))
            stack.up(timeout=180)
            facts_worker = proc.read_pid_record(stack.pid_path("worker"))
            assert facts_worker is not None
        else:
            facts_worker = spawn(worker_argv(), settings.log_dir / "worker-facts.log", settings_env(settings))
        sent, _ = asyncio.run(publish_events(bootstrap, topics, list(enumerate(wl.facts, start=1))))
        bk.say(f"published facts {dict(sent)}; waiting for the worker to process them")
        n_sessions = sum(isinstance(f, SessionBound) for f in wl.facts)
        n_grants = sum(isinstance(f, GrantIssued) for f in wl.facts)
        bk.wait_counters(settings, facts_worker, {"stage1_facts": n_sessions, "stage2_facts": n_grants}, timeout=300)
        proc.stop_process(facts_worker, timeout=60)
        facts_worker = None
        bk.say("facts processed; worker stopped")

        # -- pre-produce every call
        count, seconds = asyncio.run(produce(bootstrap, topics.tool_calls, wl.calls))
        bk.say(f"produced {count:,} calls to {topics.tool_calls} in {seconds:.1f}s ({rate(count, seconds):,.0f}/s)")
        n = len(wl.calls)
        if args.sink:
            deadline = time.monotonic() + 600
            while (lag := asyncio.run(group_lag(bootstrap, settings.sink_group, topics.tool_calls))) > 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sink still {lag} calls behind")
                time.sleep(1)
            bk.say("sink has ingested the calls into chDB (lag 0); measuring")

        # -- passthrough, once per bench run (several runs: each is short, so more exposed to other load)
        if pt_done is None:
            pt_runs = [
                passthrough_run(bootstrap, topics.tool_calls, dest, f"bench{run_id}-pt{i}", n, args.timeout)
                for i, dest in enumerate(passthrough_topics)
            ]
            pt = sorted(pt_runs, key=lambda r: r.rate)[len(pt_runs) // 2]  # the median run
            pt.all[:] = [r.rate for r in pt_runs]
            pt.fpt.append(
                passthrough_run(
                    bootstrap,
                    topics.tool_calls,
                    faust_topic,
                    f"bench{run_id}-fpt",
                    n,
                    args.timeout,
                    "faust-passthrough",
                )
            )
        else:
            pt = pt_done
        fpt = pt.fpt[0]

        # -- pipeline
        route_start = asyncio.run(end_offsets(bootstrap, topics.calls_by_route))
        evidence_start = asyncio.run(end_offsets(bootstrap, topics.evidence))
        spawned = time.time()
        env = settings_env(settings)
        if code is not None:  # the measured worker imports this tree's packages first: its working
            # directory (sys.path[0] for `-m`, before PYTHONPATH and the editable install) and PYTHONPATH
            env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [code, env.get("PYTHONPATH", "")]))}
            bk.say(f"measured worker runs the code in {code}")
        measured = spawn(worker_argv(args.profile_worker), settings.log_dir / "worker-measured.log", env, code)
        others = [
            spawn(worker_argv(), settings.log_dir / f"worker-measured-{i}.log", settings_env(settings))
            for i in range(1, args.workers)
        ]
        spy = None
        if args.py_spy:
            tag = (label or engine).replace("@baseline", "").replace("%", "pct").replace(" ", "-")
            out = f"{args.py_spy}.{tag}{'.baseline' if code else ''}.txt"
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(measured.pid),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "-o",
                    out,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        samples: list[bk.CpuSample] = []
        if others:
            stats, complete = wait_workers(settings, [measured, *others], n, args.timeout, args.stall, samples)
        else:
            stats, complete = bk.wait_counters(
                settings, measured, {"stage2_calls": n}, timeout=args.timeout, stall=args.stall, samples=samples
            )
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        time.sleep(1.0)
        if others:
            stats = summed_stats(settings, [measured, *others]) or stats
            bk.say(f"calls decided by each worker (stage 2): {stats.get('stage2_calls_each')}")
            for record in others:
                proc.stop_process(record, timeout=60)
            others = []
        else:
            stats = bk.worker_stats(settings, measured.pid) or stats
        proc.stop_process(measured, timeout=60)
        measured = None
        decided = int(stats["counters"].get("stage2_calls", 0))
        if complete:
            bk.say("pipeline: the worker decided every call in stage 2 (first version); reading record timestamps")
        else:
            bk.say(
                f"[red]pipeline: the worker stalled at {decided:,} of {n:,} calls decided "
                f"(no progress for {args.stall:.0f}s); measuring over the calls it did decide[/]"
            )
        routed = asyncio.run(read_records(bootstrap, topics.calls_by_route, route_start))
        # the internal message format is the core's own business: only timestamps are read here
        forwards = [rec.ts for rec in routed if rec.key]  # ticks have an empty key
        del routed
        evidence = asyncio.run(read_records(bootstrap, topics.evidence, evidence_start))
        first_version: dict[bytes | None, Rec] = {}
        for rec in evidence:  # per key (call id) and partition, records are in production order
            if rec.key not in first_version:
                first_version[rec.key] = rec
        firsts = sorted(rec.ts for rec in first_version.values())
        first_kinds: Counter[str] = Counter()
        first_verdicts: dict[str, str] = {}
        for rec in first_version.values():
            ev = decode(rec.value or b"")
            assert isinstance(ev, Evidence) and ev.version == 1, ev
            first_kinds[f"{'final' if ev.final else 'provisional'} {ev.verdict}"] += 1
            first_verdicts[ev.call_id] = ev.verdict
        verdicts = check_verdicts(wl, first_verdicts) if wl.expected else None
        if verdicts is not None:
            colour = "red" if verdicts["wrong"] else "green"
            bk.say(
                f"[{colour}]verdicts checked on {verdicts['checked']:,} calls: {len(verdicts['wrong']):,} wrong; "
                f"out_of_policy {verdicts['out_of_policy']:,} (expected {verdicts['out_of_policy_expected']:,})[/]"
                + (f"; e.g. {verdicts['wrong'][:3]}" if verdicts["wrong"] else "")
            )
        done = len(firsts)
        decided_ids = {(key or b"").decode() for key in first_version}
        skipped = [] if done >= n else asyncio.run(skipped_calls(bootstrap, topics.tool_calls, decided_ids))
        if done < n:
            bk.say(f"[red]{n - done:,} calls have no evidence: {describe(skipped)}[/]")
        start_ms, first_ev_ms, nth_ms = min(forwards), firsts[0], firsts[-1]
        pipe_window = (nth_ms - start_ms) / 1000
        pipe_cpu = Window.of(samples, start_ms / 1000, nth_ms / 1000)
        counters = stats.get("counters", {})
        chdb_rows = evidence_rows(settings, done) if args.sink else None
        result = dict(
            engine=label or engine,
            verdicts=verdicts,
            policy_calls=wl.policy_calls if wl.expected else None,
            n=n,
            done=done,
            skipped=skipped,
            pt_rate=pt.rate,
            pt_window=pt.window,
            pt_e2e=pt.e2e,
            pt_all=pt.all,
            fpt=fpt,
            pipe_rate=rate(done, pipe_window),
            pipe_window=pipe_window,
            pipe_rate_ev=rate(done, (nth_ms - first_ev_ms) / 1000),
            pipe_e2e=rate(done, nth_ms / 1000 - spawned),
            startup=(start_ms / 1000 - spawned),
            first_kinds=first_kinds,
            pipe_cpu=pipe_cpu,
            pt_cpu=pt.cpu,
            load=bk.load_text(),
            forwards=len(forwards),
            evidence_records=len(evidence),
            counters=counters,
            chdb_rows=chdb_rows,
            messages_per_call=counters.get("messages_sent", 0) / max(1, done),
        )
        report(args, **result)
        return result, pt
    finally:
        for record in [r for r in (measured, facts_worker, *others) if r is not None]:
            proc.stop_process(record, timeout=60)
        if stack is not None:
            stack.down()


def check_verdicts(wl: Workload, got: dict[str, str]) -> dict[str, Any]:
    """Every decided call's first verdict against the workload's expectation: in_scope, out_of_policy
    (a restricted read under the policy), or neither (outside the grants). A worker that failed
    closed (every policy call out_of_policy) or never asked Cedar (restricted reads in_scope) fails."""
    wrong: list[tuple[str, str | None, str]] = []
    out_of_policy = expected_oop = 0
    for call_id, verdict in got.items():
        want = wl.expected.get(call_id, "?")
        out_of_policy += verdict == "out_of_policy"
        expected_oop += want == "out_of_policy"
        ok = verdict == want if want is not None else verdict not in ("in_scope", "out_of_policy")
        if not ok:
            wrong.append((call_id, want, verdict))
    return {"checked": len(got), "wrong": wrong, "out_of_policy": out_of_policy, "out_of_policy_expected": expected_oop}


def compare(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    """Both engines side by side, per CPU-second (the shared machine's noise cancels)."""
    table = bk.new_table(
        f"Decision worker engines, {args.calls:,} calls, {args.partitions} partitions, {args.workers} worker(s), sink "
        + ("running" if args.sink else "not running"),
        (
            "engine",
            "calls per worker CPU-s",
            "calls/s (wall)",
            "Kafka msgs sent per call",
            "ratio to aiokafka passthrough per CPU-s",
            "target",
            "calls under a policy grant",
            "verdicts (wrong / out_of_policy / expected out_of_policy)",
        ),
    )
    for engine, r in results.items():
        per_cpu = r["done"] / max(1e-9, r["pipe_cpu"].cpu)
        pt_per_cpu = r["n"] / max(1e-9, r["pt_cpu"].cpu)
        table.add_row(
            engine,
            f"{per_cpu:,.0f}",
            f"{r['pipe_rate']:,.0f}",
            f"{r['messages_per_call']:.2f}",
            f"{per_cpu / pt_per_cpu:.1%}",
            f">= {TARGET_PER_CPU:,} {bk.mark(per_cpu >= TARGET_PER_CPU)}",
            "" if r.get("policy_calls") is None else f"{r['policy_calls'] / max(1, r['n']):.1%}",
            ""
            if not r.get("verdicts")
            else "{} / {:,} / {:,} {}".format(
                len(r["verdicts"]["wrong"]),
                r["verdicts"]["out_of_policy"],
                r["verdicts"]["out_of_policy_expected"],
                bk.mark(not r["verdicts"]["wrong"]),
            ),
        )
    r = next(iter(results.values()))
    table.add_row(
        "aiokafka passthrough (msgs)",
        f"{r['n'] / max(1e-9, r['pt_cpu'].cpu):,.0f}",
        f"{r['pt_rate']:,.0f}",
        "1",
        "",
        "",
        "",
        "",
    )
    fpt = r["fpt"]
    table.add_row(
        "Faust passthrough (msgs)", f"{r['n'] / max(1e-9, fpt.cpu.cpu):,.0f}", f"{fpt.rate:,.0f}", "1", "", "", "", ""
    )
    bk.console.print(table)


async def skipped_calls(bootstrap: str, topic: str, decided: set[str]) -> list[tuple[int, int]]:
    """(partition, offset) of the calls on ``topic`` that have no evidence."""
    out = []
    for rec in await read_records(bootstrap, topic):
        call = decode(rec.value or b"")
        if isinstance(call, ToolCall) and call.call_id not in decided:
            out.append((rec.partition, rec.offset))
    return sorted(out)


def describe(positions: list[tuple[int, int]]) -> str:
    """``p0@15-18, p1@15-19`` (contiguous offset runs per partition)."""
    runs: list[list[int]] = []
    for p, off in positions:
        if runs and runs[-1][0] == p and runs[-1][2] == off - 1:
            runs[-1][2] = off
        else:
            runs.append([p, off, off])
    text = ", ".join(f"p{p}@{a}" + (f"-{b}" if b > a else "") for p, a, b in runs[:12])
    return text + (", ..." if len(runs) > 12 else "")


@dataclass(frozen=True)
class PassthroughRun:
    rate: float  # msgs/s, first copy -> last copy
    window: float
    e2e: float  # msgs/s from process spawn
    cpu: Window
    all: list[float] = field(default_factory=list)  # every run's rate (the median run carries them)
    fpt: list[PassthroughRun] = field(default_factory=list)  # the Faust passthrough of the same bench run


def passthrough_run(
    bootstrap: str, source: str, dest: str, group: str, n: int, timeout: float, kind: str = "passthrough"
) -> PassthroughRun:
    """One passthrough process over the whole source topic (fresh group), timed from record timestamps."""
    me = str(Path(__file__).resolve())
    argv = [sys.executable, me, f"--{kind}-child", bootstrap, source, dest, group, str(n)]
    spawned = time.time()
    done, samples = run_sampled(argv, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"passthrough failed:\n{done.stderr[-3000:]}")
    ts = sorted(r.ts for r in asyncio.run(read_records(bootstrap, dest)))
    assert len(ts) == n, (len(ts), n)
    window = (ts[-1] - ts[0]) / 1000
    run = PassthroughRun(rate(n, window), window, rate(n, ts[-1] / 1000 - spawned), Window.of(samples, *_secs(ts)))
    bk.say(f"{kind} to {dest}: {n:,} msgs in {window:.2f}s = {run.rate:,.0f} msgs/s")
    return run


def _secs(ts: list[int]) -> tuple[float, float]:
    return ts[0] / 1000, ts[-1] / 1000


def evidence_rows(settings: Settings, n: int) -> int | None:
    """Evidence rows in chDB (through the sink's SQL endpoint), waiting briefly for the sink."""
    from scopewatch.sqlclient import SqlError, run_sql

    sql = f"SELECT uniqExact(call_id) FROM {settings.clickhouse_database}.evidence"
    deadline = time.monotonic() + 60
    rows = None
    while time.monotonic() < deadline:
        try:
            rows = int(run_sql(settings, sql, timeout=30)["rows"][0][0])
        except (SqlError, OSError) as exc:
            bk.say(f"chDB query failed: {exc}")
            return None
        if rows >= n:
            break
        time.sleep(1)
    return rows


def report(args: argparse.Namespace, **r: Any) -> None:
    n, done = r["n"], r["done"]
    title = (
        f"Decision throughput ({r['engine']} engine), {n:,} calls, {args.partitions} partitions, "
        f"{args.workers} worker process(es)"
    )
    if done < n:
        title += f" ({done:,} decided, {n - done:,} skipped by the worker)"
    table = bk.new_table(title, ("measure", "value", "window", "target", "result"))
    ratio = r["pipe_rate"] / r["pt_rate"]
    ok1 = r["pipe_rate"] >= TARGET_CALLS_PER_S
    ok2 = ratio >= TARGET_RATIO
    table.add_row(
        "pipeline calls/s (both stages)",
        f"{r['pipe_rate']:,.0f}",
        f"{r['pipe_window']:.2f} s",
        f">= {TARGET_CALLS_PER_S:,}",
        bk.mark(ok1),
    )
    runs = len(r["pt_all"])
    table.add_row(
        f"passthrough msgs/s (aiokafka consume->produce, median of {runs})" if runs > 1 else "passthrough msgs/s",
        f"{r['pt_rate']:,.0f}",
        f"{r['pt_window']:.2f} s",
        "",
        "",
    )
    table.add_row(
        "ratio pipeline / passthrough",
        f"{ratio:.1%}",
        "",
        f">= {TARGET_RATIO:.0%}",
        bk.mark(ok2),
    )
    fpt = r["fpt"]
    table.add_row(
        "peer: Faust passthrough msgs/s (the worker's Kafka path, no decisions)",
        f"{fpt.rate:,.0f}",
        f"{fpt.window:.2f} s",
        "",
        "",
    )
    table.add_row("ratio Faust passthrough / aiokafka passthrough", f"{fpt.rate / r['pt_rate']:.1%}", "", "", "")
    table.add_row("ratio pipeline / Faust passthrough", f"{r['pipe_rate'] / fpt.rate:.1%}", "", "", "")
    bk.console.print(table)
    extra = Table(title="Other views of the same run")
    extra.add_column("measure")
    extra.add_column("value", justify="right")
    extra.add_row("pipeline calls/s, first evidence -> N-th first evidence", f"{r['pipe_rate_ev']:,.0f}")
    extra.add_row("pipeline calls/s incl. worker start-up (spawn -> N-th)", f"{r['pipe_e2e']:,.0f}")
    extra.add_row("passthrough msgs/s, every run", ", ".join(f"{x:,.0f}" for x in r["pt_all"]))
    extra.add_row("passthrough msgs/s incl. process start-up (spawn -> N-th, median run)", f"{r['pt_e2e']:,.0f}")
    extra.add_row("worker start-up before the first call (spawn, boot, join, recovery)", f"{r['startup']:.1f} s")
    extra.add_row("stage 1 -> stage 2 forwards read", f"{r['forwards']:,}")
    extra.add_row("evidence records read (provisional + finals so far)", f"{r['evidence_records']:,}")
    extra.add_row(
        "first versions by finality and verdict",
        json.dumps(dict(sorted(r["first_kinds"].items()))),
    )
    pc, tc = r["pipe_cpu"], r["pt_cpu"]
    extra.add_row(
        "worker process CPU in its window (1 core = 100%) / machine busy (all cores = 100%)",
        f"{pc.cpu / pc.seconds:.0%} / {pc.busy:.0%}",
    )
    extra.add_row(
        "passthrough process CPU in its window (1 core = 100%) / machine busy (all cores = 100%)",
        f"{tc.cpu / tc.seconds:.0%} / {tc.busy:.0%}",
    )
    per_cpu_pipe, per_cpu_pt = done / max(1e-9, pc.cpu), n / max(1e-9, tc.cpu)
    extra.add_row("pipeline calls per worker CPU-second (workers added up)", f"{per_cpu_pipe:,.0f}")
    extra.add_row("passthrough msgs per passthrough CPU-second", f"{per_cpu_pt:,.0f}")
    extra.add_row("ratio per CPU-second (pipeline / passthrough)", f"{per_cpu_pipe / per_cpu_pt:.1%}")
    per_cpu_fpt = n / max(1e-9, fpt.cpu.cpu)
    extra.add_row(
        "Faust passthrough process CPU in its window / machine busy",
        f"{fpt.cpu.cpu / fpt.cpu.seconds:.0%} / {fpt.cpu.busy:.0%}",
    )
    extra.add_row("Faust passthrough msgs per CPU-second", f"{per_cpu_fpt:,.0f}")
    extra.add_row("load average at the end (1/5/15 min)", r["load"])
    if done < n:
        extra.add_row("[red]calls never processed by stage 1 (partition@offsets)[/]", describe(r["skipped"]))
    c = r["counters"]
    verdicts = {k.removeprefix("evidence_"): v for k, v in sorted(c.items()) if k.startswith("evidence_")}
    extra.add_row("worker counters: evidence versions by kind and verdict (all versions)", json.dumps(verdicts))
    extra.add_row("worker counters: dead letters", str(c.get("dead_letters", 0)))
    extra.add_row(
        "calls with evidence in chDB (sink)", "sink not running" if r["chdb_rows"] is None else f"{r['chdb_rows']:,}"
    )
    bk.console.print(extra)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--passthrough-child":
        bootstrap, source, dest, group, n = sys.argv[2:7]
        asyncio.run(passthrough(bootstrap, source, dest, group, int(n)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--faust-passthrough-child":
        bootstrap, source, dest, group, n = sys.argv[2:7]
        sys.argv[1:] = ["worker"]  # what faust's Worker parses
        faust_passthrough(bootstrap, source, dest, group, int(n))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000, help="tool calls to push through (default 200,000)")
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--delegations", type=int, default=500, help="delegations, two grants each")
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic (default 4, as `up`)")
    parser.add_argument("--grace", type=float, default=15.0, help="grace seconds of the worker (default 15)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="measured worker processes in one group (default 1); CPU-seconds are the workers' added up",
    )
    parser.add_argument("--passthrough-runs", type=int, default=3, help="passthrough repetitions; the median counts")
    parser.add_argument("--no-sink", dest="sink", action="store_false", help="do not run the ClickHouse sink")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for each measured phase")
    parser.add_argument(
        "--stall", type=float, default=60, help="stop waiting when the worker made no progress for this long"
    )
    parser.add_argument(
        "--profile-worker",
        metavar="FILE",
        help="run the measured worker under cProfile, stats to FILE (slows it down; for where the time goes)",
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["aiokafka", "faust"],
        choices=["aiokafka", "faust"],
        help="worker engines to measure, one after the other in this run (default both)",
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also measure each engine with the worker on the code in DIR (`git archive REV | tar -x -C DIR`)",
    )
    parser.add_argument(
        "--py-spy",
        metavar="PREFIX",
        help="sample the measured worker with py-spy (raw stacks to PREFIX.<engine>.txt); costs the worker little",
    )
    parser.add_argument(
        "--policy-share",
        type=lambda text: [float(x) for x in text.split(",")],
        metavar="S[,S...]",
        help="e.g. 0,0.1,1: one pipeline per share, that fraction of delegations with grants naming a Cedar "
        "policy (published before the calls); verdicts are checked (exit 1 if any is wrong)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, broker data)")
    bk.exit_with(run, parser.parse_args())


if __name__ == "__main__":
    main()
