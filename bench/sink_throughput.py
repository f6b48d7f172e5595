"""Rows per second of the ClickHouse sink into embedded chDB, with realistic evidence rows (issue 4).

Target: at least 250,000 rows/s on one core. Two measurements, each in a fresh child process
pinned to one CPU (``--cpu``; chDB's own threads inherit the pinning), so "one core" is literal:

**(a) writer alone.** ``ClickHouseWriter.insert_columns`` (the sink's only path into ClickHouse)
of batches of 10k, 20k and 50k evidence rows into a migrated chDB folder, repeated; rows/s = rows
/ wall time of the call. The columns are what the sink hands the writer: the row tuples of the
columnar fast path, transposed. The same child also times the sink's per-message Python work
before a batch reaches the writer (``ClickHouseSink._absorb_many``: the generated fast reader per
message; and, for comparison, the full path ``decode`` + ``to_row``), how an insert splits between
chDB's engine and Python, and a what-if: chDB parsing the same Avro bodies itself.

**(b) the whole sink.** A real local Kafka broker (KRaft, 127.0.0.1, free ports, temp folder);
N evidence messages are produced to the evidence topic first (4 partitions, as ``up``). Then a
child first reads them all with a bare aiokafka consumer (no processing: the floor aiokafka sets
on one core), then runs ``ClickHouseSink`` exactly as ``scopewatch sink`` configures it (all the
sink topics, default batch rows/seconds unless told otherwise, the fsynced intent file, offsets
committed after each insert) until its row counter reaches N. rows/s = rows / (time the counter
reached N - time the first batch was counted), i.e. steady state after the consumer joined; the
figure from the sink's start (group join included) is printed too. The broker is not pinned.

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
import contextlib
import cProfile
import hashlib
import io
import json
import os
import pstats
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import benchkit as bk
from decisions_throughput import build_workload, produce

from schemas import Evidence, decode, encode
from scopewatch.stack.kafka import create_topics
from stream_jobs.runtime.settings import Settings

CODE = (
    "stream_jobs/sink.py",
    "stream_jobs/columnar.py",
    "stream_jobs/rows.py",
    "stream_jobs/clickhouse.py",
    "schemas/codec.py",
    "schemas/events.py",
)  # printed as sha256 prefixes: there is no commit to name

PATHS = ("bulk", "rows", "bulk-crec", "bulk-rdk", "rows-rdk", "bulk-rdk-avro")
TARGET_ROWS_PER_S = 250_000
TARGET_PER_CPU_S = 120_000
DATABASE = "scopewatch"
EVIDENCE_TOPIC = "bench.audit.evidence"


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


def realistic_evidence(n: int, pool_calls: int = 2000, seed: int = 7, fresh_sessions: bool = False) -> list[Evidence]:
    """``n`` evidence records: the pool, cloned with fresh ids and times. With ``fresh_sessions`` each clone of
    the pool has sessions of its own: a new session id in ``session_id`` and in the reasons that quote it, and
    new fact ids and hashes, so reason and fact lists repeat only within a session (as in production, where
    sessions do not come back), not across clones."""
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
        fresh: dict[str, Any] = {}
        if fresh_sessions and round_:
            sid = ids.setdefault((round_, ev.session_id), str(uuid.uuid4()))
            facts = [ids.setdefault((round_, f), str(uuid.uuid4())) for f in ev.fact_ids]
            fresh = {
                "session_id": sid,
                "reasons": [r.replace(ev.session_id, sid) for r in ev.reasons],
                "fact_ids": facts,
                "fact_hashes": ["sha256:" + hashlib.sha256(f.encode()).hexdigest() for f in facts],
            }
        out.append(
            ev.model_copy(
                update={
                    **fresh,
                    "call_id": call_id,
                    "evidence_id": str(uuid.uuid4()),
                    "call_time": call_time,
                    "decided_at": call_time + timedelta(milliseconds=3 if ev.version == 1 else 15_000),
                }
            )
        )
    return out


def realistic_raw(events: list[Evidence], per: int) -> list[tuple[str, bytes, bytes]]:
    """``per`` raw messages per evidence record (topic attribute, key, value): its call's tool call and
    tool result, alternately, keyed as the collectors key them."""
    from schemas import ToolCall, ToolResult, key_for

    out: list[tuple[str, bytes, bytes]] = []
    for i, ev in enumerate(events):
        for j in range(per):
            t = ev.call_time
            record: ToolCall | ToolResult
            if (i * per + j) % 2 == 0:
                record = ToolCall(
                    event_id=str(uuid.uuid4()),
                    event_time=t,
                    tenant=ev.tenant,
                    call_id=ev.call_id,
                    session_id=ev.session_id,
                    server=ev.server,
                    tool=ev.tool,
                    arguments={"path": f"/data/{i}/{j}"},
                    resources=[f"file:/data/{i}/{j}"],
                    transport="stdio",
                )
                out.append(("tool_calls", key_for(record).encode(), encode(record)))
            else:
                record = ToolResult(
                    event_id=str(uuid.uuid4()),
                    event_time=t,
                    tenant=ev.tenant,
                    call_id=ev.call_id,
                    session_id=ev.session_id,
                    status="ok",
                    duration_ms=1.5,
                )
                out.append(("tool_results", key_for(record).encode(), encode(record)))
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


def _records(messages: list[bytes], partitions: int = 4) -> list[list[Any]]:
    """The messages as the consumer hands them to the sink: per partition, in offset order."""
    from aiokafka.structs import ConsumerRecord

    out: list[list[Any]] = [[] for _ in range(partitions)]
    for offset, value in enumerate(messages):
        part = offset % partitions
        out[part].append(ConsumerRecord(EVIDENCE_TOPIC, part, offset, 0, 0, None, value, None, 0, len(value), ()))
    return out


def _engine_timer(writer: Any) -> list[float]:
    """Accumulates the process time of the writer's call into chDB (reading the Arrow table, writing the part)."""
    spent = [0.0]
    insert = writer._insert_arrow

    def timed(*a: Any, **k: Any) -> Any:
        c0 = time.process_time()
        try:
            return insert(*a, **k)
        finally:
            spent[0] += time.process_time() - c0

    writer._insert_arrow = timed
    return spent


def _ocf(schema: dict[str, Any], bodies: list[bytes]) -> bytes:
    """An Avro object container file holding ``bodies`` (single-object headers stripped) as one block."""

    def varint(n: int) -> bytes:
        n = (n << 1) ^ (n >> 63)
        out = bytearray()
        while n & ~0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
        return bytes(out)

    sync = b"scopewatch-bench"
    meta = {b"avro.schema": json.dumps(schema).encode(), b"avro.codec": b"null"}
    head = bytearray(b"Obj\x01") + varint(len(meta))
    for k, v in meta.items():
        head += varint(len(k)) + k + varint(len(v)) + v
    data = b"".join(bodies)
    return bytes(head) + varint(0) + sync + varint(len(bodies)) + varint(len(data)) + data + sync


def insert_variants(client: Any, rows: list[tuple[Any, ...]], repeat: int) -> dict[str, dict[str, float]]:
    """The same evidence rows through each way of inserting tried for issue 4; median wall and CPU seconds.

    Rounds are interleaved (every variant once per round) so that a change in the machine's load
    affects all of them alike.
    """
    import pyarrow as pa
    import pyarrow.ipc

    from stream_jobs.columnar import arrow_table
    from stream_jobs.rows import COLUMNS, TIME_COLUMNS
    from stream_jobs.sink import INSERT_SETTINGS, ClickHouseWriter

    names = list(COLUMNS["evidence"])
    table = f"{DATABASE}.evidence"
    writer = ClickHouseWriter(client, DATABASE)
    types = writer._column_types("evidence")
    type_names = [types[c] for c in names]
    plain = [t.removeprefix("LowCardinality(")[:-1] if t.startswith("LowCardinality(") else t for t in type_names]
    columns = list(zip(*rows, strict=True))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    dated = [
        [None if v is None else epoch + timedelta(milliseconds=v) for v in col]
        if name in TIME_COLUMNS["evidence"]
        else col
        for name, col in zip(names, columns, strict=True)
    ]
    dict_rows = [dict(zip(names, row, strict=True)) for row in zip(*dated, strict=True)]
    native = {**INSERT_SETTINGS}
    old = {"async_insert": 0}

    def via_insert(data: Callable[[], Any], settings: dict[str, Any], **kw: Any) -> Callable[[str], Any]:
        """A variant: ``client.insert`` of ``data()`` (built inside the timed call) with these settings."""
        return lambda tok: client.insert(
            table, data(), column_names=names, settings={**settings, "insert_deduplication_token": tok}, **kw
        )

    def ipc_stream() -> bytes:
        sink = pa.BufferOutputStream()
        batch = arrow_table(names, type_names, columns)
        with pyarrow.ipc.new_stream(sink, batch.schema) as out:
            out.write_table(batch)
        return bytes(sink.getvalue())

    variants: dict[str, Any] = {
        "old writer: dict rows, row-oriented, datetimes (optimize_on_insert on)": via_insert(
            lambda: [[r[c] for c in names] for r in dict_rows], old
        ),
        "column-oriented Native, datetimes": via_insert(lambda: dated, old, column_oriented=True),
        "  + integer ms ticks, column types given (no DESCRIBE per insert)": via_insert(
            lambda: columns, old, column_type_names=type_names, column_oriented=True
        ),
        "  + optimize_on_insert=0 (the writer's path into a server)": via_insert(
            lambda: columns, native, column_type_names=type_names, column_oriented=True
        ),
        "  + LowCardinality columns sent as String": via_insert(
            lambda: columns, native, column_type_names=plain, column_oriented=True
        ),
        "Arrow IPC stream, raw_insert (through a temp file, as Native is)": lambda tok: client.raw_insert(
            table, names, ipc_stream(), settings={**native, "insert_deduplication_token": tok}, fmt="ArrowStream"
        ),
        "Arrow table read in place, INSERT ... SELECT FROM Python() (the writer's chDB path)": lambda tok: (
            writer.insert_columns("evidence", names, columns, tok)
        ),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for round_ in range(repeat):
        for name, run in variants.items():
            c0 = time.process_time()
            t0 = time.perf_counter()
            run(f"variant:{round_}:{name}")
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {
        name: {"rows": len(rows), "wall": median(w for w, _ in ts), "cpu": median(c for _, c in ts)}
        for name, ts in times.items()
    }


def writer_child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in its own process, pinned: ClickHouseWriter.insert_columns of batches into a fresh chDB folder."""
    pinned = bk.pin_to(args.cpu)
    from schemas.codec import AVRO_DIR
    from stream_jobs.clickhouse import connect, migrate
    from stream_jobs.rows import COLUMNS, Provenance, check_row, row_values, to_row
    from stream_jobs.sink import INSERT_SETTINGS, Batch, ClickHouseSink, ClickHouseWriter, SinkConfig, columns_of

    home = Path(args.home)
    client = connect(f"chdb://{home / 'chdb'}")
    migrate(client, DATABASE)
    writer = ClickHouseWriter(client, DATABASE)
    biggest = max(args.batches)
    events = realistic_evidence(biggest)
    rows_info = describe_rows(events[:2000])
    messages = [encode(e) for e in events]
    del events
    now = datetime.now(UTC)
    per_partition = _records(messages)

    # The sink's per-message work before the writer, fast path: ClickHouseSink._absorb_many per fetched partition.
    sink = ClickHouseSink(SinkConfig(bootstrap="", topics=[], group="bench"), writer)
    fast_runs = []
    batch = Batch()
    for _ in range(3):
        batch = Batch()
        c0 = time.process_time()
        t0 = time.perf_counter()
        for records in per_partition:
            for i in range(0, len(records), 2500):  # a fetch returns up to ~2,500 of these per partition
                sink._absorb_many(batch, records[i : i + 2500], now)
        fast_runs.append({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0})
    rows = batch.rows["evidence"]
    assert len(rows) == len(messages) and sink.counters["full_path"] == 0, "every message should take the fast path"
    # The full path (what the sink did for every message before), on a sample: decode + to_row + check_row.
    sample = messages[: min(len(messages), 10_000)]
    t0 = time.perf_counter()
    for offset, value in enumerate(sample):
        table, row = to_row(decode(value), Provenance(EVIDENCE_TOPIC, offset % 4, offset, now))
        check_row(table, row)
        row_values(table, row)
    full_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for value in sample:
        decode(value)
    decode_s = time.perf_counter() - t0
    del messages
    names = list(COLUMNS["evidence"])
    t0 = time.perf_counter()
    for i in range(0, len(rows), 10_000):  # as the sink does at each flush of a (default) 10,000-row batch
        columns_of(rows[i : i + 10_000])
    transpose_s = time.perf_counter() - t0

    results: dict[str, list[dict[str, float]]] = {}
    writer.insert_columns("evidence", names, list(zip(*rows[:1000], strict=True)), "warm-up")
    engine = _engine_timer(writer)
    seq = 0
    for size in args.batches:
        columns = list(zip(*rows[:size], strict=True))
        runs = []
        for _ in range(args.repeat):
            seq += 1
            engine[0] = 0.0
            c0 = time.process_time()
            t0 = time.perf_counter()
            writer.insert_columns("evidence", names, columns, f"evidence|bench:{seq}")
            wall = time.perf_counter() - t0
            runs.append({"rows": size, "wall": wall, "cpu": time.process_time() - c0, "engine": engine[0]})
        results[str(size)] = runs

    # What-if: chDB decodes the same Avro bodies itself (C++), no Python per row or column.
    schema = json.loads((AVRO_DIR / "evidence.avsc").read_text())
    fields = [f["name"] for f in schema["fields"] if f["name"] != "extra_json"]
    c0 = time.process_time()
    container = _ocf(schema, [r.value[10:] for records in per_partition for r in records[: biggest // 4]])
    ocf_cpu = time.process_time() - c0
    avro_walls = []
    for _ in range(args.repeat):
        seq += 1
        t0 = time.perf_counter()
        with writer.lock:
            client.raw_insert(
                f"{DATABASE}.evidence",
                fields,
                container,
                settings={
                    **INSERT_SETTINGS,
                    "insert_deduplication_token": f"avro:{seq}",
                    "input_format_skip_unknown_fields": 1,
                },
                fmt="Avro",
            )
        avro_walls.append(time.perf_counter() - t0)
    variants = insert_variants(client, rows[:biggest], args.repeat) if args.variants else {}
    profile_text = ""
    if args.profile:
        columns = list(zip(*rows[:biggest], strict=True))
        prof = cProfile.Profile()
        prof.enable()
        writer.insert_columns("evidence", names, columns, "evidence|bench:profile")
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile)
        profile_text = out.getvalue()
    total = int(client.query(f"SELECT count() FROM {DATABASE}.evidence").result_rows[0][0])
    return {
        "pinned": pinned,
        "rows_info": rows_info,
        "fast": {"rows": len(rows), "runs": fast_runs},
        "full": {"rows": len(sample), "wall": full_s, "decode_wall": decode_s},
        "transpose": {"rows": len(rows), "wall": transpose_s},
        "inserts": results,
        "avro_what_if": {"rows": biggest // 4 * 4, "walls": avro_walls, "container_cpu": ocf_cpu},
        "variants": variants,
        "rows_in_table": total,
        "profile": profile_text,
    }


# ------------------------------------------------------------------------- (b) sink child


def sink_child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in its own process, pinned: ClickHouseSink over the pre-filled topic until N rows."""
    pinned = bk.pin_to(args.cpu)
    from stream_jobs.clickhouse import connect, migrate
    from stream_jobs.service import sink_topics
    from stream_jobs.sink import ClickHouseSink, ClickHouseWriter, SinkConfig

    settings = Settings(home=Path(args.home), bootstrap=args.bootstrap, topic_prefix=args.prefix, sink_group=args.group)
    client = connect(settings.dsn)
    migrate(client, settings.clickhouse_database)
    evidence_tables = ["evidence"]
    stored = {
        str(r[0])
        for r in client.query(
            f"SELECT name FROM system.tables WHERE database = '{settings.clickhouse_database}'"
        ).result_rows
    }
    if "evidence_rows" in stored:  # migration 0010 (issue 16): rows + the reason and fact lists stored once
        evidence_tables = ["evidence_rows", "evidence_reason_lists", "evidence_fact_lists"]
    if args.evidence_sets:  # the by-set layout (bench/evidence_sets.py), a prototype on this tree only
        from evidence_sets import SET_TABLES, restructure

        db_ = settings.clickhouse_database
        cols = client.query(
            f"SELECT name FROM system.columns WHERE database = '{db_}' AND table = 'evidence' ORDER BY position"
        ).result_rows
        restructure(client.command, [c[0] for c in cols], db_)
        evidence_tables = list(SET_TABLES)
    if args.no_merges:  # the sink's own work alone (bench/merge_cost.py prices the merges per merged row)
        for table in evidence_tables:
            client.command(f"SYSTEM STOP MERGES {settings.clickhouse_database}.{table}")
    decoder = "avro" if args.path.endswith("-avro") else settings.sink_decoder  # bulk-rdk: the default (auto)
    writer = ClickHouseWriter(client, settings.clickhouse_database, decoder=decoder)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    config = SinkConfig(
        bootstrap=settings.kafka_bootstrap,
        topics=sink_topics(settings),
        group=settings.sink_group,
        batch_rows=args.batch_rows or settings.sink_batch_rows,
        batch_seconds=args.batch_seconds or settings.sink_batch_seconds,
        intent_file=settings.run_dir / "sink-intent.json",
        bulk_avro=args.path.startswith("bulk"),
        lean_records=not args.path.endswith("-crec"),
        client=client_of(args.path),
    )
    if hasattr(config, "latency_target"):  # not on a --baseline tree from before it
        target = settings.sink_latency_target if args.latency_target is None else args.latency_target
        config.latency_target = target or None
    if hasattr(config, "malloc_keep_mb"):  # as the service sets it (not on a --baseline tree from before it)
        config.malloc_keep_mb = settings.sink_malloc_keep_mb
    if hasattr(config, "raw_seconds"):  # as the service sets it (not on a --baseline tree from before it)
        config.raw_seconds = settings.sink_raw_seconds if args.raw_seconds is None else args.raw_seconds
        config.fast_topics = frozenset({settings.topics.evidence})
    if hasattr(config, "backlog_rows"):  # as the service sets it
        config.backlog_rows = settings.sink_backlog_rows if args.backlog_rows is None else args.backlog_rows
    if hasattr(config, "backlog_seconds"):  # as the service sets it (not on a --baseline tree from before it)
        config.backlog_seconds = settings.sink_backlog_seconds
        config.backlog_idle_ms = max(500, 5 * config.fetch_wait_ms)
    n = args.messages * (1 + args.raw)  # the raw messages (--raw) are rows too
    evidence_topic = settings.topics.evidence
    bare = consume_only_rdkafka if config.client == "librdkafka" else consume_only
    paced = args.rate > 0  # the parent produces while the sink runs: no floor (the messages are not there yet)
    floor = (
        {"rows": 1, "wall": 0.0, "cpu": 0.0}
        if paced
        else asyncio.run(bare(settings, n, config.batch_rows, f"{args.group}-floor"))
    )
    sink = ClickHouseSink(config, writer)
    marks: dict[str, Any] = {}
    flushes: list[tuple[float, list[list[Any]], float]] = []  # (end wall clock, [[partition, first, last]], seconds)
    flush = sink.output.flush

    async def timed_flush(out: Any) -> Any:
        began = time.time()
        result = await flush(out)
        at = time.time()
        spans = [[p, a, b] for batch in out for (t, p), (a, b) in batch.ranges.items() if t == evidence_topic]
        flushes.append((at, spans, at - began))
        return result

    sink.output.flush = timed_flush  # type: ignore[method-assign]
    assigned = sink.assigned

    async def ready(tps: Any) -> None:
        await assigned(tps)
        if tps:
            (Path(args.home) / "assigned").touch()  # the parent starts sending paced messages now

    sink.assigned = ready  # type: ignore[method-assign]

    db = settings.clickhouse_database

    def merged_rows() -> int:
        """Rows MergeTree merges have read so far in this process (chDB's MergedRows event)."""
        out = client.query("SELECT value FROM system.events WHERE event = 'MergedRows'").result_rows
        return int(out[0][0]) if out else 0

    def merging() -> int:
        return int(client.query(f"SELECT count() FROM system.merges WHERE database = '{db}'").result_rows[0][0])

    async def watch() -> None:
        while True:
            rows = sink.counters["rows"]
            now = time.perf_counter()
            if rows and "first_at" not in marks:
                marks.update(first_at=now, first_rows=rows, first_cpu=time.process_time(), first_merged=merged_rows())
            if rows >= n:
                marks.update(done_at=now, done_rows=rows, done_cpu=time.process_time(), done_merged=merged_rows())
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

    # the merges the run left behind, done in this process as a production sink does them: their CPU is
    # added to the window's for the "merges settled" figure (conservative: they also merge the first batch)
    def settle() -> None:
        quiet, deadline = 0, time.monotonic() + 240
        while quiet < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
            quiet = quiet + 1 if merging() == 0 else 0

    def evidence_parts() -> int:
        return int(
            client.query(
                f"SELECT count() FROM system.parts WHERE database = '{db}' AND table = '{evidence_tables[0]}' "
                "AND active"
            ).result_rows[0][0]
        )

    window_peak_mb = peak_rss_mb()  # before the settle, the reads and the OPTIMIZE
    c0 = time.process_time()
    settle()
    settle_cpu = time.process_time() - c0
    settled_merged = merged_rows()
    parts = evidence_parts()
    # what the parts left cost a reader: evidence_current (the latest version of every call), process CPU, warm
    reads = []
    for _ in range(3):
        r0 = time.process_time()
        client.query(f"SELECT count(), sum(length(reasons)) FROM {db}.evidence_current")
        reads.append(time.process_time() - r0)
    # the fixed horizon: every merge owed until the evidence is one part (the debt the parts left still carry;
    # a partition already one part is not rewritten)
    c1 = time.process_time()
    if not args.no_merges:
        for table in evidence_tables:
            client.command(f"OPTIMIZE TABLE {db}.{table} FINAL SETTINGS optimize_skip_merged_partitions = 1")
        settle()
    one_part_cpu = time.process_time() - c1
    stats = sink.stats()
    total = int(
        client.query(f"SELECT count() FROM {settings.clickhouse_database}.{evidence_tables[0]}").result_rows[0][0]
    )
    return {
        "pinned": pinned,
        "batch_rows": config.batch_rows,
        "batch_seconds": config.batch_seconds,
        "steady_rows": marks["done_rows"] - marks["first_rows"],
        "steady_wall": marks["done_at"] - marks["first_at"],
        "steady_cpu": marks["done_cpu"] - marks["first_cpu"],
        "steady_window": (marks["first_at"], marks["done_at"]),
        "steady_merged_rows": marks["done_merged"] - marks["first_merged"],
        "settle_cpu": settle_cpu,
        "settled_merged_rows": settled_merged - marks["first_merged"],
        "evidence_parts": parts,
        "current_read_cpu": sorted(reads)[1],
        "one_part_cpu": one_part_cpu,
        "one_part_merged_rows": merged_rows() - settled_merged,
        "one_part_parts": evidence_parts(),
        "total_rows": marks["done_rows"],
        "total_wall": marks["done_at"] - marks["start"],
        "total_cpu": marks["done_cpu"] - marks["start_cpu"],
        "startup": marks["first_at"] - marks["start"],
        "batches": stats.get("batches", 0),
        "retries": stats.get("retries", 0),
        "dead_letters": stats.get("dead_letters", 0),
        "full_path": stats.get("full_path", 0),
        "bulk_rows": stats.get("bulk_rows", 0),
        "bulk_fallbacks": stats.get("bulk_fallbacks", 0),
        "rowbinary_fallbacks": getattr(writer, "rowbinary_fallbacks", 0),  # containers inserted as Avro instead
        "transcoder_loaded": transcoder_loaded(),
        "evidence_tables": evidence_tables,
        "path": args.path,
        "client": config.client,
        "rows_in_table": total,
        "consume_only": floor,
        "flushes": flushes if paced else [],
        "flush_rows": [sum(b - a + 1 for _p, a, b in spans) for _at, spans, _took in flushes],
        "fill_seconds": getattr(sink.runner.config, "fill_seconds", None) if sink.runner else None,
        "code": os.environ.get("PYTHONPATH", ""),
        "maxrss_mb": peak_rss_mb(),
        "window_peak_mb": window_peak_mb,
    }


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM: reset at exec, unlike ``ru_maxrss``, which keeps the parent's peak
    at fork when that was bigger, as the bench's parent holding the messages is)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def client_of(path: str) -> str:
    """The sink's Kafka client for a (b) path: ``-rdk`` librdkafka, otherwise aiokafka."""
    return "librdkafka" if "-rdk" in path else "aiokafka"


async def consume_only_rdkafka(settings: Settings, n: int, batch_rows: int, group: str) -> dict[str, float]:
    """A bare confluent-kafka (librdkafka) consumer reading the same messages, touching each value, from its own
    thread as the sink's adapter does (its C threads' CPU counts: process CPU)."""
    from confluent_kafka import Consumer

    def read() -> dict[str, float]:
        consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "fetch.min.bytes": 256 * 1024,
                "fetch.wait.max.ms": 100,
                "max.partition.fetch.bytes": 4 * 1024 * 1024,
                "queued.max.messages.kbytes": 32 * 1024,
            }
        )
        consumer.subscribe([settings.topics.evidence])
        try:
            got = first = 0
            t0 = c0 = 0.0
            while got < n:
                messages = consumer.consume(batch_rows, 0.5)
                if not got and messages:
                    t0, c0, first = time.perf_counter(), time.process_time(), len(messages)
                got += len(messages)
                for msg in messages:
                    msg.value()
            return {"rows": got - first, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
        finally:
            consumer.close()

    return await asyncio.to_thread(read)


async def consume_only(settings: Settings, n: int, batch_rows: int, group: str) -> dict[str, float]:
    """A bare aiokafka consumer reading the same messages, touching each value: aiokafka's own cost per message."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        settings.topics.evidence,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=batch_rows,
    )
    await consumer.start()
    try:
        got = first = 0
        t0 = c0 = 0.0
        size = 0
        while got < n:
            records = await consumer.getmany(timeout_ms=500, max_records=batch_rows)
            for messages in records.values():
                if not got and messages:
                    t0, c0, first = time.perf_counter(), time.process_time(), len(messages)
                got += len(messages)
                for msg in messages:
                    size += len(msg.value or b"")
        return {"rows": got - first, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    finally:
        await consumer.stop()


# ------------------------------------------------------------------------- parent


def start_child(
    kind: str, args: argparse.Namespace, extra: list[str], code: str | None = None
) -> subprocess.Popen[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *extra]
    if args.cpu is not None:
        argv += ["--cpu", str(args.cpu)]
    if kind == "sink" and args.py_spy:
        spy = Path(sys.executable).with_name("py-spy")
        out = Path(args.py_spy).resolve()
        if code is not None:
            out = out.with_name(out.name + ".baseline")
        spy_args = ["record", "-r", "250", "--native", "--threads", "--format", "raw", "-o", str(out)]
        argv = [str(spy), *spy_args, "--", *argv]
    if kind == "sink" and args.perf:
        out = Path(args.perf).resolve()
        if code is not None:
            out = out.with_name(out.name + ".baseline")
        graph = ["-g"] if os.environ.get("BENCH_PERF_G") else []  # call graphs (kernel stacks are the useful part)
        argv = ["perf", "record", "-k", "CLOCK_MONOTONIC", "-F", "1999", *graph, "-o", str(out), "--", *argv]
    env = dict(os.environ)
    if code is not None:  # the child imports the packages of that tree first (before the editable install)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [code, env.get("PYTHONPATH", "")]))
        env["SCOPEWATCH_AVRO_ROWBINARY_LIB"] = str(baseline_library(Path(code)))
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )


def transcoder_loaded() -> bool:
    from stream_jobs import rowbinary

    return rowbinary.library() is not None


def baseline_library(code: Path) -> Path:
    """The baseline tree's own RowBinary transcoder, built from its source into the tree (once): this tree's
    library has another interface version (the loader of an older tree would refuse it and read Avro)."""
    from stream_jobs.rowbinary import LIBRARY_NAME

    lib = code / LIBRARY_NAME
    if not lib.exists():
        source = code / "stream_jobs" / "native" / "avro_rowbinary.c"
        cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(lib), str(source), "-lcrypto"]
        subprocess.run(cmd, check=True, capture_output=True)
    return lib


def child_result(kind: str, child: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
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


def paced_produce(
    bootstrap: str,
    topic: str,
    messages: list[tuple[bytes, bytes]],
    rate: float,
    partitions: int,
    raw: Sequence[tuple[str, bytes, bytes]] = (),
) -> float:
    """Send message i to partition i % partitions at ``start + i / rate`` (a 2 ms tick); returns ``start`` (wall clock).

    The topic is fresh, so message i lands at offset i // partitions: its send time is known from its offset.
    """
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "all"})
    per = len(raw) // len(messages) if messages else 0
    start = time.time()
    sent = 0
    while sent < len(messages):
        due = min(len(messages), int((time.time() - start) * rate) + 1)
        while sent < due:
            key, value = messages[sent]
            producer.produce(topic, value=value, key=key, partition=sent % partitions)
            for raw_topic, raw_key, raw_value in raw[sent * per : (sent + 1) * per]:  # --raw: its raw messages
                producer.produce(raw_topic, value=raw_value, key=raw_key)
            sent += 1
        producer.poll(0)
        time.sleep(0.002)
    producer.flush(30)
    return start


def paced_delays(run: dict[str, Any], start: float, rate: float, partitions: int, skip: float) -> list[float]:
    """Send → visible (flush end) of every message sent ``skip`` seconds after the first flush."""
    flushes = run["flushes"]
    if not flushes:
        return []
    from_time = flushes[0][0] + skip
    out = []
    for at, spans, _took in flushes:
        for p, a, b in spans:
            for o in range(a, b + 1):
                sent = start + (o * partitions + p) / rate
                if sent >= from_time:
                    out.append(at - sent)
    return out


def run_child(kind: str, args: argparse.Namespace, extra: list[str], timeout: float) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *extra]
    if args.cpu is not None:
        argv += ["--cpu", str(args.cpu)]
    if kind == "sink" and args.py_spy:
        spy = Path(sys.executable).with_name("py-spy")
        argv = [
            str(spy),
            "record",
            "--native",
            "--threads",
            "--format",
            "raw",
            "--output",
            str(Path(args.py_spy).resolve()),
            "--",
            *argv,
        ]
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


def report(
    args: argparse.Namespace, writer: dict[str, Any] | None, sink: dict[str, dict[str, Any]] | None, load: str
) -> None:
    table = bk.new_table(
        "Sink rows/s into chDB, realistic evidence rows",
        ("measure", "value", "detail", "target", "result"),
        left=("measure", "detail"),
    )
    if writer is not None:
        for size, runs in writer["inserts"].items():
            rates = [rate(r["rows"], r["wall"]) for r in runs]
            cpu = sum(r["cpu"] for r in runs) / sum(r["wall"] for r in runs)
            best = median(rates)
            table.add_row(
                f"(a) ClickHouseWriter.insert_columns, {int(size):,}-row batches",
                f"{best:,.0f}",
                f"median of {len(runs)}; min {min(rates):,.0f} max {max(rates):,.0f}; process CPU {cpu:.0%}",
                f">= {TARGET_ROWS_PER_S:,}",
                bk.mark(best >= TARGET_ROWS_PER_S),
            )
    for path, run in (sink or {}).items():
        per_cpu = rate(run["steady_rows"], run["steady_cpu"])
        rounds = run.get("rounds", [])
        of_rounds = (
            f"median of {len(rounds)} rounds ({', '.join(f'{r:,.0f}' for r in rounds)}); " if len(rounds) > 1 else ""
        )
        table.add_row(
            f"(b) ClickHouseSink, Kafka -> chDB, {path} path: rows per sink CPU-second",
            f"{per_cpu:,.0f}",
            f"{of_rounds}{run['steady_rows']:,} rows in {run['steady_wall']:.2f}s after the first batch; "
            f"{rate(run['steady_rows'], run['steady_wall']):,.0f} rows/s wall; "
            f"process CPU {run['steady_cpu'] / max(1e-9, run['steady_wall']):.0%}",
            f">= {TARGET_PER_CPU_S:,} (issue 16)",
            bk.mark(per_cpu >= TARGET_PER_CPU_S),
        )
    bk.console.print(table)

    extra = bk.new_table("Where the time goes, and other views of the same run", ("measure", "value"))

    def per_row(rows: float, seconds: float) -> str:
        return f"{rate(rows, seconds):,.0f} rows/s ({seconds / rows * 1e6:.2f} µs/row)"

    if writer is not None:
        info = writer["rows_info"]
        extra.add_row("CPU of the children", writer["pinned"])
        extra.add_row(
            "row shape (mean)",
            f"Avro {info['avro_bytes']:.0f} B, facts JSON {info['facts_json_bytes']:.0f} B, "
            f"{info['reasons_per_row']:.1f} reasons / {info['reasons_bytes']:.0f} B, {info['final_share']:.0%} final",
        )
        fast = writer["fast"]
        best = min(fast["runs"], key=lambda r: r["wall"])
        extra.add_row(
            "sink per-message work, fast path: ClickHouseSink._absorb_many (best of 3)",
            per_row(fast["rows"], best["wall"]),
        )
        full = writer["full"]
        extra.add_row(
            "  for comparison, the full path: decode + to_row + check_row", per_row(full["rows"], full["wall"])
        )
        extra.add_row(
            "  of which Avro decode alone (fastavro + pydantic validation)", per_row(full["rows"], full["decode_wall"])
        )
        tr = writer["transpose"]
        extra.add_row("row tuples -> columns (zip), at each flush of 10,000 rows", per_row(tr["rows"], tr["wall"]))
        biggest = str(max(int(s) for s in writer["inserts"]))
        runs = writer["inserts"][biggest]
        wall = median(r["wall"] for r in runs)
        engine = median(r["engine"] for r in runs)
        rows = runs[0]["rows"]
        extra.add_row(
            f"(a) {int(biggest):,}-row insert: in chDB (INSERT ... SELECT FROM Python(): read Arrow, write the part)",
            per_row(rows, engine),
        )
        extra.add_row(
            f"(a) {int(biggest):,}-row insert: the rest (building the Arrow table)", per_row(rows, wall - engine)
        )
        insert_rate = rate(rows, wall)
        combined = 1 / (1 / rate(fast["rows"], best["wall"]) + 1 / insert_rate + tr["wall"] / tr["rows"])
        extra.add_row(
            "fast path + transpose + insert in series (one core; ceiling of (b) without Kafka)",
            f"{combined:,.0f} rows/s",
        )
        av = writer["avro_what_if"]
        extra.add_row(
            f"what-if: chDB decodes the same {av['rows']:,} Avro bodies itself (INSERT ... FORMAT Avro, median)",
            per_row(av["rows"], median(av["walls"])),
        )
        extra.add_row(
            "evidence rows in the writer's table (re-inserted rows collapse when ReplacingMergeTree merges)",
            f"{writer['rows_in_table']:,}",
        )
    for path, run in (sink or {}).items():
        floor = run["consume_only"]
        name = {
            "bulk": "bulk Avro path (chDB decodes), aiokafka lean records",
            "rows": "per-message path (Python reader), aiokafka lean records",
            "bulk-crec": "bulk Avro path, aiokafka ConsumerRecords (before lean records)",
            "bulk-rdk": "bulk path (SCOPEWATCH_SINK_DECODER, default auto: RowBinary when built), librdkafka",
            "bulk-rdk-avro": "bulk Avro path (chDB decodes Avro), librdkafka (confluent-kafka)",
            "rows-rdk": "per-message path (Python reader), librdkafka (confluent-kafka)",
        }[path.split("@")[0]] + (" -- on the --baseline code" if path.endswith("@baseline") else "")
        bare = "librdkafka" if run.get("client") == "librdkafka" else "aiokafka"
        if floor["wall"] > 0:  # not measured in paced runs
            extra.add_row(
                f"(b) [{path}] a bare {bare} consumer over the same messages (no processing), same CPU",
                f"{per_row(floor['rows'], floor['wall'])}, process CPU {floor['cpu'] / floor['wall']:.0%}",
            )
        extra.add_row(
            f"(b) [{path}] rows/s including consumer start and group join",
            f"{rate(run['total_rows'], run['total_wall']):,.0f} ({run['startup']:.1f}s to the first batch)",
        )
        extra.add_row(
            f"(b) [{path}] rows per sink CPU-second from the start (start, group join, prefetch before the first "
            "batch included)",
            f"{rate(run['total_rows'], run['total_cpu']):,.0f} "
            f"({run['total_cpu'] / run['total_rows'] * 1e6:.2f} µs/row)",
        )
        extra.add_row(
            f"(b) {name}: rows per sink CPU-second (steady)",
            f"{rate(run['steady_rows'], run['steady_cpu']):,.0f} "
            f"({run['steady_cpu'] / max(1, run['steady_rows']) * 1e6:.2f} µs CPU/row; "
            f"{rate(run['steady_rows'], run['steady_wall']):,.0f} rows/s wall)",
        )
        extra.add_row(
            f"(b) [{path}] batches / retries / dead letters / full path / bulk rows / bulk fallbacks / "
            "containers read as Avro (transcoder refused)",
            f"{run['batches']} / {run['retries']} / {run['dead_letters']} / {run['full_path']} / "
            f"{run['bulk_rows']} / {run['bulk_fallbacks']} / {run.get('rowbinary_fallbacks', '-')}",
        )
        extra.add_row(
            f"(b) [{path}] RowBinary transcoder loaded; evidence tables",
            f"{run.get('transcoder_loaded', '-')}; {', '.join(run.get('evidence_tables', []))}",
        )
        if run.get("flush_rows"):
            extra.add_row(
                f"(b) [{path}] evidence rows per flush (the median round)",
                ", ".join(f"{n:,}" for n in run["flush_rows"]),
            )
        extra.add_row(
            f"(b) [{path}] batch bound (rows / seconds; fill seconds at the end)",
            f"{run['batch_rows']:,} / {run['batch_seconds']} / {run.get('fill_seconds')}",
        )
        if "settle_cpu" in run:
            settled = [rate(r["steady_rows"], r["steady_cpu"] + r["settle_cpu"]) for r in run.get("all", [run])]
            extra.add_row(
                f"(b) [{path}] merges: rows merged per row in the window / until they settled; rows per sink "
                "CPU-second with the merges that followed the window added (rounds); evidence parts at the end",
                f"{run['steady_merged_rows'] / max(1, run['steady_rows']):.2f} / "
                f"{run['settled_merged_rows'] / max(1, run['steady_rows']):.2f} (rounds: "
                + ", ".join(
                    f"{r['steady_merged_rows'] / max(1, r['steady_rows']):.2f} / "
                    f"{r['settled_merged_rows'] / max(1, r['steady_rows']):.2f}"
                    for r in run.get("all", [run])
                )
                + "); "
                f"{sorted(settled)[len(settled) // 2]:,.0f} ({', '.join(f'{x:,.0f}' for x in settled)}); "
                f"{run['evidence_parts']}",
            )
        if "one_part_cpu" in run:
            whole = [
                rate(r["steady_rows"], r["steady_cpu"] + r["settle_cpu"] + r["one_part_cpu"])
                for r in run.get("all", [run])
            ]
            extra.add_row(
                f"(b) [{path}] to one evidence part (the fixed horizon: window + the settle + OPTIMIZE FINAL of the "
                "parts left): rows per sink CPU-second (rounds); µs/row; evidence_current read with the parts left "
                "(ms CPU, rounds)",
                f"{sorted(whole)[len(whole) // 2]:,.0f} ({', '.join(f'{x:,.0f}' for x in whole)}); "
                f"{1e6 / sorted(whole)[len(whole) // 2]:.2f} µs/row; "
                + ", ".join(f"{r['current_read_cpu'] * 1000:,.0f}" for r in run.get("all", [run])),
            )
        if "delays" in run:
            d = sorted(run["delays"]) or [float("nan")]
            q = [d[min(len(d) - 1, int(f * len(d)))] * 1000 for f in (0.5, 0.99, 1.0)]
            extra.add_row(
                f"(b) [{path}] paced at {args.rate:,.0f}/s: sink CPU per 1,000 rows (median round; rounds)",
                f"{run['steady_cpu'] / max(1, run['steady_rows']) * 1e6:.1f} ms "
                f"({', '.join(f'{1e6 / r:.1f}' for r in run.get('rounds', []))}); {run['flushes']} flushes "
                f"(wall median {run['flush_ms'][0]:.0f} ms, max {run['flush_ms'][1]:.0f} ms)",
            )
            extra.add_row(
                f"(b) [{path}] paced: send -> visible (flush end), messages from 1 s after the first flush",
                f"p50 {q[0]:,.0f} ms, p99 {q[1]:,.0f} ms, max {q[2]:,.0f} ms ({len(run['delays']):,} messages)",
            )
        extra.add_row(f"(b) [{path}] evidence rows in chDB at the end", f"{run['rows_in_table']:,}")
        if "maxrss_mb" in run:
            extra.add_row(
                f"(b) [{path}] sink process peak RSS: in the window / at the end (rounds)",
                ", ".join(
                    f"{r.get('window_peak_mb', 0):,.0f} / {r.get('maxrss_mb', 0):,.0f} MB"
                    for r in run.get("all", [run])
                ),
            )
    extra.add_row("load average before / after (1/5/15 min)", f"{load} / {bk.load_text()}")
    bk.console.print(extra)
    if writer is not None and writer["variants"]:
        variants = bk.new_table(
            "(a) ways of inserting the largest batch (interleaved rounds, medians)",
            ("variant", "rows/s (wall)", "rows per CPU-second"),
            left=("variant",),
        )
        for name, v in writer["variants"].items():
            variants.add_row(name, f"{rate(v['rows'], v['wall']):,.0f}", f"{rate(v['rows'], v['cpu']):,.0f}")
        bk.console.print(variants)
    if writer is not None and writer["profile"]:
        bk.console.print("cProfile of one insert of the largest batch (tottime):")
        print(writer["profile"])


def parent(args: argparse.Namespace) -> int:
    bk.announce(CODE)
    load = bk.quiet_load(args)
    bk.say(f"load average {load}")
    writer = sink = None
    with bk.temp_folder("scopewatch-bench-sink-", args.keep) as tmp, contextlib.ExitStack() as cleanup:
        if not args.skip_writer:
            bk.say(f"(a) writer alone: batches {args.batches}, {args.repeat} each, fresh chDB under {tmp}")
            extra = [
                "--home",
                str(tmp / "writer"),
                "--batches",
                ",".join(map(str, args.batches)),
                "--repeat",
                str(args.repeat),
                "--profile",
                str(args.profile),
                *([] if args.variants else ["--no-variants"]),
            ]
            writer = run_child("writer", args, extra, args.timeout)
            shutil.rmtree(tmp / "writer", ignore_errors=True)
        if not args.skip_sink:
            run_id = uuid.uuid4().hex[:8]
            settings = Settings(home=tmp / "sink", bootstrap="127.0.0.1:0", topic_prefix=f"bench{run_id}.")
            broker = bk.local_broker(tmp, settings.cache_dir)
            cleanup.callback(broker.stop)
            bootstrap = broker.config.bootstrap
            bk.say(f"(b) Kafka broker ready on {bootstrap}; creating topics, building {args.messages:,} evidence rows")
            events = realistic_evidence(args.messages, fresh_sessions=args.session_lists)
            messages = [(e.call_id.encode(), encode(e)) for e in events]
            raw_messages = realistic_raw(events, args.raw) if args.rate else []
            del events
            if not args.rate:
                asyncio.run(create_topics(bootstrap, settings.topics.all(), args.partitions))
                count, seconds = asyncio.run(produce(bootstrap, settings.topics.evidence, messages))
                bk.say(f"produced {count:,} evidence messages in {seconds:.1f}s; starting the sink")
            sink = {}
            labels: list[tuple[str, str | None]] = [(path, None) for path in args.paths]
            if args.baseline:
                labels += [(path, str(Path(args.baseline).resolve())) for path in args.paths]
            runs: dict[str, list[dict[str, Any]]] = {}
            for round_ in range(args.rounds):  # interleaved: a change in the machine's load hits every path alike
                for i, (path, code) in enumerate(labels):
                    label = path if code is None else f"{path}@baseline"
                    prefix = settings.topic_prefix
                    if args.rate:  # a fresh topic per run: message i is at offset i // partitions
                        prefix = f"bench{run_id}r{round_}p{i}."
                        paced_topics = Settings(home=tmp / "sink", bootstrap=bootstrap, topic_prefix=prefix).topics
                        asyncio.run(create_topics(bootstrap, paced_topics.all(), args.partitions))
                    extra = [
                        "--home",
                        str(tmp / f"sink-{path}"),
                        "--bootstrap",
                        bootstrap,
                        "--prefix",
                        prefix,
                        "--group",
                        f"bench{run_id}-sink-{path}-{i}-{round_}",
                        "--messages",
                        str(args.messages),
                        "--batch-rows",
                        str(args.batch_rows or 0),
                        "--batch-seconds",
                        str((args.baseline_batch_seconds if code is not None else 0) or args.batch_seconds or 0),
                        "--timeout",
                        str(args.timeout),
                        "--path",
                        path,
                        "--rate",
                        str(args.rate),
                        "--raw",
                        str(args.raw if args.rate else 0),
                        *([] if args.raw_seconds is None else ["--raw-seconds", str(args.raw_seconds)]),
                        *([] if args.backlog_rows is None else ["--backlog-rows", str(args.backlog_rows)]),
                        *([] if args.latency_target is None else ["--latency-target", str(args.latency_target)]),
                        *(["--no-merges"] if args.no_merges else []),
                        *(["--evidence-sets"] if args.evidence_sets and code is None else []),
                    ]
                    bk.say(
                        f"(b) sink, {label} path"
                        + (f", round {round_ + 1} of {args.rounds}" if args.rounds > 1 else "")
                        + (f", messages paced at {args.rate:,.0f}/s" if args.rate else "")
                    )
                    child = start_child("sink", args, extra, code)
                    start = None
                    if args.rate:
                        flag = tmp / f"sink-{path}" / "assigned"
                        deadline = time.monotonic() + 120
                        while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
                            time.sleep(0.05)  # the child's start and group join
                        raw = [(getattr(paced_topics, t), k, v) for t, k, v in raw_messages]
                        start = paced_produce(
                            bootstrap, paced_topics.evidence, messages, args.rate, args.partitions, raw
                        )
                    result = child_result("sink", child, args.timeout + 120)
                    if start is not None:
                        result["delays"] = paced_delays(result, start, args.rate, args.partitions, 1.0)
                        took = sorted(f[2] for f in result["flushes"])
                        result["flush_ms"] = (took[len(took) // 2] * 1000, took[-1] * 1000) if took else (0, 0)
                        result["flushes"] = len(result["flushes"])
                    runs.setdefault(label, []).append(result)
                    if args.perf:  # `perf report --time A,B` limits the samples to the steady window
                        a, b = result["steady_window"]
                        bk.say(f"(b) {label}: perf steady window --time {a:.6f},{b:.6f}")
                    shutil.rmtree(tmp / f"sink-{path}", ignore_errors=True)
            del messages
            for path, results in runs.items():
                ranked = sorted(results, key=lambda r: rate(r["steady_rows"], r["steady_cpu"]))
                sink[path] = {
                    **ranked[len(ranked) // 2],
                    "rounds": [rate(r["steady_rows"], r["steady_cpu"]) for r in results],
                    "all": results,
                }
        report(args, writer, sink, load)
    return 0


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
        "--no-variants",
        dest="variants",
        action="store_false",
        help="skip (a)'s comparison of insert formats and settings on the largest batch",
    )
    parser.add_argument(
        "--perf",
        help="record the sink child with `perf record` (samples of every thread to FILE; FILE.baseline for --baseline)",
    )
    parser.add_argument(
        "--py-spy",
        metavar="FILE",
        help="record the sink child with py-spy (raw collapsed stacks to FILE; slows it down; for where the time goes)",
    )
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--session-lists",
        action="store_true",
        help="every clone of the evidence pool with sessions of its own (realistic_evidence fresh_sessions): reason "
        "and fact lists repeat only within a session (20 calls), as in production",
    )
    parser.add_argument(
        "--evidence-sets",
        action="store_true",
        help="this tree's sink writes the by-set evidence layout (bench/evidence_sets.py's prototype: reasons and "
        "fact references once per distinct set); the --baseline tree the migrated table",
    )
    parser.add_argument(
        "--paths",
        type=lambda v: [p for p in v.split(",") if p],
        default=["bulk", "rows"],
        help="sink paths for (b), in this order: bulk (Avro containers decoded by chDB), rows (Python reader), "
        "bulk-crec (bulk with aiokafka's ConsumerRecords instead of lean records: the path before them); "
        "bulk-rdk, rows-rdk: the same over librdkafka (confluent-kafka) instead of aiokafka (bulk-rdk with the "
        "default decoder: RowBinary when the transcoder is built); bulk-rdk-avro: bulk-rdk reading Avro",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the (b) paths this many times, interleaved; report each one's median"
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run each (b) path on the code in DIR (`git archive REV | tar -x -C DIR`), interleaved",
    )
    parser.add_argument(
        "--baseline-batch-seconds",
        type=float,
        default=0.0,
        help="sink batch seconds of the --baseline runs (default: as --batch-seconds)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="(b) paced: produce the messages at this rate while the sink runs (fresh topics per run) and report "
        "the sink's CPU per 1,000 rows and send -> visible delay (default: all produced before the sink starts)",
    )
    parser.add_argument(
        "--latency-target",
        type=float,
        default=None,
        help="the sink's latency target in seconds (0: off; default: the settings', SCOPEWATCH_SINK_LATENCY_TARGET)",
    )
    parser.add_argument(
        "--raw",
        type=int,
        default=0,
        help="(b) paced: with each evidence message also send this many raw messages (a tool call, a tool result, "
        "alternately, to their topics), as the pipeline's sink sees them (2: one call and one result per evidence row)",
    )
    parser.add_argument(
        "--raw-seconds",
        type=float,
        default=None,
        help="the sink's SINK_RAW_SECONDS for the runs of this tree (0: off; default: the settings')",
    )
    parser.add_argument(
        "--backlog-rows",
        type=int,
        default=None,
        help="the sink's SINK_BACKLOG_ROWS for the runs of this tree (0: off; default: the settings')",
    )
    parser.add_argument(
        "--no-merges",
        action="store_true",
        help="(b) stop the evidence table's background merges in the sink (SYSTEM STOP MERGES): the sink's own "
        "work alone, without the merge work whose timing varies between rounds (bench/merge_cost.py prices it)",
    )
    parser.add_argument("--path", choices=PATHS, default="bulk", help=argparse.SUPPRESS)
    bk.add_common_options(parser)
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
    bk.exit_with(parent, args)


if __name__ == "__main__":
    main()
