"""Rows per second of the ClickHouse sink into embedded chDB, with realistic evidence rows (issue 4).

Target: at least 250,000 rows/s on one core. Two measurements, each in a fresh child process
pinned to one CPU (``--cpu``; chDB's own threads inherit the pinning), so "one core" is literal:

**(a) writer alone.** ``ClickHouseWriter.insert`` (the sink's only path into ClickHouse) of
batches of 10k, 20k and 50k evidence rows into a migrated chDB folder, repeated; rows/s = rows
/ wall time of the call. The same child also times the per-row Python work the sink does before
a batch reaches the writer (Avro ``decode`` + ``to_row``), on the same core, so the figures add
up to where the time of (b) goes.

**(b) the whole sink.** A real local Kafka broker (KRaft, 127.0.0.1, free ports, temp folder);
N evidence messages are produced to the evidence topic first (4 partitions, as ``up``). Then a
child runs ``ClickHouseSink`` exactly as ``scopewatch sink`` configures it (all the sink topics,
default batch rows/seconds unless told otherwise, the fsynced intent file, offsets committed
after each insert) until its row counter reaches N. rows/s = rows / (time the counter reached
N - time the first batch was counted), i.e. steady state after the consumer joined; the figure
from the sink's start (group join included) is printed too. The broker is not pinned.

Rows: real verdicts. The decision processors (``detections.live`` through the tests' LiveSim,
the same code the worker runs) decide the calls of ``decisions_throughput.build_workload``
(80 % in scope, 20 % out of scope), provisional and final versions; that pool is cloned with
fresh call ids, evidence ids and times up to the rows needed. A row carries 4-5 reasons (about
450 B) and ``facts`` canonical JSON of about 760 B, 1.5 KB of Avro per message.

Usage: ``.venv/bin/python bench/sink_throughput.py [--messages 200000] [--cpu 1] ...``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchkit import (
    add_common_options,
    code_fingerprint,
    console,
    load_text,
    machine,
    mark,
    pin_to,
    quiet_load,
    remove_temp,
    say,
)
from decisions_throughput import build_workload, produce
from rich.table import Table

from schemas import Evidence, decode, encode
from scopewatch.settings import Settings
from scopewatch.stack import proc
from scopewatch.stack.kafka import KafkaBroker, create_topics, start_broker

CODE = (
    "stream_jobs/sink.py",
    "stream_jobs/rows.py",
    "stream_jobs/clickhouse.py",
    "schemas/codec.py",
    "schemas/events.py",
)  # printed as sha256 prefixes: there is no commit to name

TARGET_ROWS_PER_S = 250_000
DATABASE = "scopewatch"


# ------------------------------------------------------------------------- rows


def evidence_pool(calls: int, seed: int = 7) -> list[Evidence]:
    """Real verdicts (provisional and final) of ``calls`` calls, from the live decision processors."""
    from support.live_sim import LiveSim

    wl = build_workload(calls, max(10, calls // 10), max(5, calls // 40), seed)
    now = datetime.now(UTC)
    sim = LiveSim(partitions=4)
    for fact in wl.facts:
        sim.deliver(fact, now)
    for i, (_key, value) in enumerate(wl.calls):
        t = now + timedelta(microseconds=50 * i)
        sim.deliver(decode(value), t)
        sim.drain(t)
    later = now + timedelta(minutes=5)
    sim.tick(later)  # past the grace: the final versions
    return list(sim.evidence)


def realistic_evidence(n: int, pool_calls: int = 2000, seed: int = 7) -> list[Evidence]:
    """``n`` evidence records: the pool, cloned with fresh ids and times."""
    pool = evidence_pool(pool_calls, seed)
    random.Random(seed).shuffle(pool)  # provisional and final versions mixed, as on the topic
    base = datetime.now(UTC).replace(microsecond=0)
    out: list[Evidence] = []
    ids: dict[tuple[int, str], str] = {}
    for i in range(n):
        ev = pool[i % len(pool)]
        round_ = i // len(pool)
        call_id = ids.setdefault((round_, ev.call_id), str(uuid.uuid4()))
        call_time = base + timedelta(milliseconds=i)
        out.append(
            ev.model_copy(
                update={
                    "call_id": call_id,
                    "evidence_id": str(uuid.uuid4()),
                    "call_time": call_time,
                    "decided_at": call_time + timedelta(milliseconds=3 if ev.version == 1 else 15_000),
                }
            )
        )
    return out


def describe_rows(sample: list[Evidence]) -> dict[str, Any]:
    from schemas import canonical_json

    avro = [len(encode(e)) for e in sample]
    facts = [len(canonical_json(e.facts)) for e in sample]
    reasons = [sum(len(r) for r in e.reasons) for e in sample]
    return {
        "avro_bytes": sum(avro) / len(avro),
        "facts_json_bytes": sum(facts) / len(facts),
        "reasons_bytes": sum(reasons) / len(reasons),
        "reasons_per_row": sum(len(e.reasons) for e in sample) / len(sample),
        "final_share": sum(e.final for e in sample) / len(sample),
        "verdicts": sorted({e.verdict for e in sample}),
    }


# ------------------------------------------------------------------------- (a) writer child


def writer_child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in its own process, pinned: ClickHouseWriter.insert of batches into a fresh chDB folder."""
    pinned = pin_to(args.cpu)
    from stream_jobs.clickhouse import connect, migrate
    from stream_jobs.rows import Provenance, to_row
    from stream_jobs.sink import ClickHouseWriter

    home = Path(args.home)
    client = connect(f"chdb://{home / 'chdb'}")
    migrate(client, DATABASE)
    writer = ClickHouseWriter(client, DATABASE)
    biggest = max(args.batches)
    events = realistic_evidence(biggest)
    rows_info = describe_rows(events[:2000])
    messages = [encode(e) for e in events]

    # The sink's per-message Python work before the writer: decode + to_row (ClickHouseSink._absorb).
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    c0 = time.process_time()
    rows = []
    for offset, value in enumerate(messages):
        _table, row = to_row(decode(value), Provenance("bench.audit.evidence", offset % 4, offset, now))
        rows.append(row)
    absorb_s = time.perf_counter() - t0
    absorb_cpu = time.process_time() - c0
    t0 = time.perf_counter()
    for value in messages:
        decode(value)
    decode_s = time.perf_counter() - t0
    del messages, events

    results: dict[str, list[dict[str, float]]] = {}
    warm = rows[:1000]
    writer.insert("evidence", warm, "warm-up")
    seq = 0
    for size in args.batches:
        runs = []
        for _ in range(args.repeat):
            seq += 1
            batch = rows[:size]
            c0 = time.process_time()
            t0 = time.perf_counter()
            writer.insert("evidence", batch, f"evidence|bench:{seq}")
            wall = time.perf_counter() - t0
            runs.append({"rows": size, "wall": wall, "cpu": time.process_time() - c0})
        results[str(size)] = runs

    # How the insert time splits: the writer's own row -> column-list conversion, clickhouse-connect, chDB.
    batch = rows[:biggest]
    columns = list(batch[0].keys())
    t0 = time.perf_counter()
    _data = [[row[c] for c in columns] for row in batch]
    listing_s = time.perf_counter() - t0
    # What-if: the same rows handed to clickhouse-connect column-oriented (no transposition in Python).
    columnar = [[row[c] for row in batch] for c in columns]
    what_if = []
    for _ in range(args.repeat):
        seq += 1
        t0 = time.perf_counter()
        with writer.lock:
            client.insert(
                f"{DATABASE}.evidence",
                columnar,
                column_names=columns,
                column_oriented=True,
                settings={"insert_deduplication_token": f"evidence|bench:{seq}", "async_insert": 0},
            )
        what_if.append(time.perf_counter() - t0)
    profile_text = ""
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        writer.insert("evidence", batch, "evidence|bench:profile")
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile)
        profile_text = out.getvalue()
    total = int(client.query(f"SELECT count() FROM {DATABASE}.evidence").result_rows[0][0])
    return {
        "pinned": pinned,
        "rows_info": rows_info,
        "absorb": {"rows": len(rows), "wall": absorb_s, "cpu": absorb_cpu, "decode_wall": decode_s},
        "inserts": results,
        "listing": {"rows": len(batch), "wall": listing_s},
        "column_oriented": {"rows": len(batch), "walls": what_if},
        "rows_in_table": total,
        "profile": profile_text,
    }


# ------------------------------------------------------------------------- (b) sink child


def sink_child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in its own process, pinned: ClickHouseSink over the pre-filled topic until N rows."""
    pinned = pin_to(args.cpu)
    from stream_jobs.clickhouse import connect, migrate
    from stream_jobs.service import sink_topics
    from stream_jobs.sink import ClickHouseSink, ClickHouseWriter, SinkConfig

    settings = Settings(home=Path(args.home), bootstrap=args.bootstrap, topic_prefix=args.prefix, sink_group=args.group)
    client = connect(settings.dsn)
    migrate(client, settings.clickhouse_database)
    writer = ClickHouseWriter(client, settings.clickhouse_database)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    config = SinkConfig(
        bootstrap=settings.kafka_bootstrap,
        topics=sink_topics(settings),
        group=settings.sink_group,
        batch_rows=args.batch_rows or settings.sink_batch_rows,
        batch_seconds=args.batch_seconds or settings.sink_batch_seconds,
        intent_file=settings.run_dir / "sink-intent.json",
    )
    sink = ClickHouseSink(config, writer)
    n = args.messages
    marks: dict[str, Any] = {}

    async def watch() -> None:
        while True:
            rows = sink.counters["rows"]
            now = time.perf_counter()
            if rows and "first_at" not in marks:
                marks.update(first_at=now, first_rows=rows, first_cpu=time.process_time())
            if rows >= n:
                marks.update(done_at=now, done_rows=rows, done_cpu=time.process_time())
                sink.stop()
                return
            await asyncio.sleep(0.005)

    async def main() -> None:
        marks["start"] = time.perf_counter()
        marks["start_cpu"] = time.process_time()
        watcher = asyncio.create_task(watch())
        runner = asyncio.create_task(sink.run())
        done, _ = await asyncio.wait({watcher, runner}, timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED)
        if runner in done:
            runner.result()  # raises what the sink raised
        sink.stop()
        await asyncio.wait_for(runner, 60)
        watcher.cancel()

    asyncio.run(main())
    if "done_at" not in marks:
        raise TimeoutError(f"the sink wrote {sink.counters['rows']} of {n} rows in {args.timeout}s")
    stats = sink.stats()
    total = int(client.query(f"SELECT count() FROM {settings.clickhouse_database}.evidence").result_rows[0][0])
    return {
        "pinned": pinned,
        "batch_rows": config.batch_rows,
        "batch_seconds": config.batch_seconds,
        "steady_rows": marks["done_rows"] - marks["first_rows"],
        "steady_wall": marks["done_at"] - marks["first_at"],
        "steady_cpu": marks["done_cpu"] - marks["first_cpu"],
        "total_rows": marks["done_rows"],
        "total_wall": marks["done_at"] - marks["start"],
        "total_cpu": marks["done_cpu"] - marks["start_cpu"],
        "startup": marks["first_at"] - marks["start"],
        "batches": stats.get("batches", 0),
        "retries": stats.get("retries", 0),
        "dead_letters": stats.get("dead_letters", 0),
        "rows_in_table": total,
    }


# ------------------------------------------------------------------------- parent


def run_child(kind: str, args: argparse.Namespace, extra: list[str], timeout: float) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *extra]
    if args.cpu is not None:
        argv += ["--cpu", str(args.cpu)]
    if kind == "sink" and args.py_spy:
        spy = Path(sys.executable).with_name("py-spy")
        argv = [str(spy), "record", "--format", "raw", "--output", str(Path(args.py_spy).resolve()), "--", *argv]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({child.returncode}):\n{err[-4000:]}")
    result: dict[str, Any] = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return result


def rate(rows: float, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("inf")


def report(args: argparse.Namespace, writer: dict[str, Any] | None, sink: dict[str, Any] | None, load: str) -> None:
    table = Table(title="Sink rows/s into chDB, realistic evidence rows")
    for col in ("measure", "value", "detail", "target", "result"):
        table.add_column(col, justify="left" if col in ("measure", "detail") else "right")
    if writer is not None:
        for size, runs in writer["inserts"].items():
            rates = [rate(r["rows"], r["wall"]) for r in runs]
            cpu = sum(r["cpu"] for r in runs) / sum(r["wall"] for r in runs)
            best = median(rates)
            table.add_row(
                f"(a) ClickHouseWriter.insert, {int(size):,}-row batches",
                f"{best:,.0f}",
                f"median of {len(runs)}; min {min(rates):,.0f} max {max(rates):,.0f}; process CPU {cpu:.0%}",
                f">= {TARGET_ROWS_PER_S:,}",
                mark(best >= TARGET_ROWS_PER_S),
            )
    if sink is not None:
        steady = rate(sink["steady_rows"], sink["steady_wall"])
        table.add_row(
            "(b) ClickHouseSink, Kafka -> chDB, end to end",
            f"{steady:,.0f}",
            f"{sink['steady_rows']:,} rows in {sink['steady_wall']:.2f}s after the first batch; "
            f"process CPU {sink['steady_cpu'] / sink['steady_wall']:.0%}",
            f">= {TARGET_ROWS_PER_S:,}",
            mark(steady >= TARGET_ROWS_PER_S),
        )
    console.print(table)

    extra = Table(title="Where the time goes, and other views of the same run")
    extra.add_column("measure")
    extra.add_column("value", justify="right")
    if writer is not None:
        info = writer["rows_info"]
        extra.add_row("CPU of the children", writer["pinned"])
        extra.add_row(
            "row shape (mean)",
            f"Avro {info['avro_bytes']:.0f} B, facts JSON {info['facts_json_bytes']:.0f} B, "
            f"{info['reasons_per_row']:.1f} reasons / {info['reasons_bytes']:.0f} B, {info['final_share']:.0%} final",
        )
        a = writer["absorb"]
        extra.add_row(
            "sink per-message Python work: Avro decode + to_row (rows/s, one core)",
            f"{rate(a['rows'], a['wall']):,.0f}",
        )
        extra.add_row("  of which Avro decode alone (rows/s)", f"{rate(a['rows'], a['decode_wall']):,.0f}")
        lst = writer["listing"]
        extra.add_row(
            "ClickHouseWriter's dict rows -> column lists (rows/s, part of (a))",
            f"{rate(lst['rows'], lst['wall']):,.0f}",
        )
        runs = writer["inserts"][str(max(int(s) for s in writer["inserts"]))]
        insert_rate = median(rate(r["rows"], r["wall"]) for r in runs)
        combined = 1 / (1 / rate(a["rows"], a["wall"]) + 1 / insert_rate)
        extra.add_row("decode + to_row + insert in series (rows/s, one core; ceiling of (b))", f"{combined:,.0f}")
        co = writer["column_oriented"]
        extra.add_row(
            f"what-if: the same {co['rows']:,} rows inserted column-oriented (rows/s, median)",
            f"{median(rate(co['rows'], w) for w in co['walls']):,.0f}",
        )
        extra.add_row(
            "evidence rows in the writer's table (re-inserted rows collapse when ReplacingMergeTree merges)",
            f"{writer['rows_in_table']:,}",
        )
    if sink is not None:
        extra.add_row(
            "(b) rows/s including consumer start and group join",
            f"{rate(sink['total_rows'], sink['total_wall']):,.0f} ({sink['startup']:.1f}s to the first batch)",
        )
        extra.add_row("(b) rows per sink CPU-second (steady)", f"{rate(sink['steady_rows'], sink['steady_cpu']):,.0f}")
        extra.add_row(
            "(b) batches / retries / dead letters",
            f"{sink['batches']} / {sink['retries']} / {sink['dead_letters']}",
        )
        extra.add_row("(b) batch bound (rows / seconds)", f"{sink['batch_rows']:,} / {sink['batch_seconds']}")
        extra.add_row("(b) evidence rows in chDB at the end", f"{sink['rows_in_table']:,}")
    extra.add_row("load average before / after (1/5/15 min)", f"{load} / {load_text()}")
    console.print(extra)
    if writer is not None and writer["profile"]:
        console.print("cProfile of one insert of the largest batch (tottime):")
        print(writer["profile"])


def parent(args: argparse.Namespace) -> int:
    say(f"machine: {machine()}")
    say(f"code: {code_fingerprint(CODE)}")
    load = quiet_load(args)
    say(f"load average {load}")
    tmp = Path(tempfile.mkdtemp(prefix="scopewatch-bench-sink-"))
    broker: KafkaBroker | None = None
    writer = sink = None
    try:
        if not args.skip_writer:
            say(f"(a) writer alone: batches {args.batches}, {args.repeat} each, fresh chDB under {tmp}")
            extra = [
                "--home",
                str(tmp / "writer"),
                "--batches",
                ",".join(map(str, args.batches)),
                "--repeat",
                str(args.repeat),
                "--profile",
                str(args.profile),
            ]
            writer = run_child("writer", args, extra, args.timeout)
            shutil.rmtree(tmp / "writer", ignore_errors=True)
        if not args.skip_sink:
            run_id = uuid.uuid4().hex[:8]
            settings = Settings(home=tmp / "sink", bootstrap="127.0.0.1:0", topic_prefix=f"bench{run_id}.")
            broker = start_broker(
                tmp / "kafka", settings.cache_dir, port=proc.free_port(), controller_port=proc.free_port()
            )
            bootstrap = broker.config.bootstrap
            say(f"(b) Kafka broker ready on {bootstrap}; creating topics, building {args.messages:,} evidence rows")
            asyncio.run(create_topics(bootstrap, settings.topics.all(), args.partitions))
            events = realistic_evidence(args.messages)
            messages = [(e.call_id.encode(), encode(e)) for e in events]
            del events
            count, seconds = asyncio.run(produce(bootstrap, settings.topics.evidence, messages))
            del messages
            say(f"produced {count:,} evidence messages in {seconds:.1f}s; starting the sink")
            extra = [
                "--home",
                str(tmp / "sink"),
                "--bootstrap",
                bootstrap,
                "--prefix",
                settings.topic_prefix,
                "--group",
                f"bench{run_id}-sink",
                "--messages",
                str(args.messages),
                "--batch-rows",
                str(args.batch_rows or 0),
                "--batch-seconds",
                str(args.batch_seconds or 0),
                "--timeout",
                str(args.timeout),
            ]
            sink = run_child("sink", args, extra, args.timeout + 120)
        report(args, writer, sink, load)
        return 0
    finally:
        if broker is not None:
            broker.stop()
        remove_temp(tmp, args.keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000, help="evidence messages for (b) (default 200,000)")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 20_000, 50_000])
    parser.add_argument("--repeat", type=int, default=5, help="inserts per batch size in (a)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-rows", type=int, default=0, help="sink batch rows (default: the settings', 10,000)")
    parser.add_argument("--batch-seconds", type=float, default=0.0, help="sink batch seconds (default 0.5)")
    parser.add_argument("--cpu", type=int, default=1, help="CPU the measured children are pinned to")
    parser.add_argument("--no-pin", dest="cpu", action="store_const", const=None, help="do not pin the children")
    parser.add_argument("--skip-writer", action="store_true")
    parser.add_argument("--skip-sink", action="store_true")
    parser.add_argument("--profile", type=int, default=0, help="print the top N functions of one insert")
    parser.add_argument(
        "--py-spy",
        metavar="FILE",
        help="record the sink child with py-spy (raw collapsed stacks to FILE; slows it down; for where the time goes)",
    )
    parser.add_argument("--timeout", type=float, default=900)
    add_common_options(parser)
    # child-only
    parser.add_argument("--child", choices=["writer", "sink"], help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = writer_child(args) if args.child == "writer" else sink_child(args)
        print(json.dumps(result))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(parent(args))


if __name__ == "__main__":
    main()
