"""Sink batching, row mapping and migration parsing (no services)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from stream_jobs.clickhouse import Statement, jsonable, load_migrations, parse_statements, split_statements
from stream_jobs.rows import COLUMNS, Provenance, to_row
from stream_jobs.runtime.settings import Settings
from stream_jobs.service import sink_config
from stream_jobs.sink import MIN_FILL_SECONDS, Batch, ClickHouseSink, fill_seconds_for
from support.samples import SAMPLES

T = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
PROV = Provenance("mcp.tool-calls", 3, 42, T)


def test_batch_token_is_stable_and_offsets_commit_past_the_last() -> None:
    a, b = Batch(), Batch()
    for batch, order in ((a, [(0, 5), (1, 9), (0, 6)]), (b, [(1, 9), (0, 6), (0, 5)])):
        for partition, offset in order:
            batch.add("tool_calls", {"x": offset}, "topic", partition, offset)
    assert a.token("tool_calls") == b.token("tool_calls") == "tool_calls|topic:0:5-6,topic:1:9-9"
    assert a.offsets() == {("topic", 0): 7, ("topic", 1): 10}
    assert a.size == 3


def test_the_librdkafka_sink_consumer_commits_only_explicitly_and_logs_through_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink's librdkafka consumer: no automatic commit or offset store (the runner commits after
    ClickHouse accepted the rows), the aiokafka consumer's isolation level, the same fetch bounds, and
    the library's logs through Python logging at notice level at most (never a debug context)."""

    from stream_jobs.rdkafka_adapter import LIBRARY_ROUTE, RdKafkaConsumer

    monkeypatch.delenv("SCOPEWATCH_SINK_CRASH_AT", raising=False)
    config = sink_config(Settings(home=tmp_path, sink_fetch_wait_ms=25))
    assert config.client == "librdkafka", "the default"
    consumer = ClickHouseSink(config, writer=None).new_consumer()  # type: ignore[arg-type]
    assert isinstance(consumer, RdKafkaConsumer)
    options = consumer.config
    assert options["enable.auto.commit"] is False and options["enable.auto.offset.store"] is False
    assert options["isolation.level"] == "read_uncommitted" and options["auto.offset.reset"] == "earliest"
    assert (options["fetch.min.bytes"], options["fetch.wait.max.ms"]) == (config.fetch_min_bytes, 25)
    assert options["max.partition.fetch.bytes"] == config.fetch_partition_bytes
    assert options["group.id"] == config.group and options["bootstrap.servers"] == config.bootstrap
    assert options["logger"] is LIBRARY_ROUTE and options["log_level"] <= 5
    assert "debug" not in options
    with pytest.raises(ValueError, match="unknown Kafka client"):
        ClickHouseSink(replace(config, client="kafka-python"), writer=None).new_consumer()  # type: ignore[arg-type]


@pytest.mark.parametrize(("table", "record"), SAMPLES, ids=[s[0] + ":" + type(s[1]).__name__ for s in SAMPLES])
def test_every_record_maps_to_its_table_with_provenance(table: str, record: object) -> None:
    got, row = to_row(record, PROV)
    assert got == table
    assert (row["_topic"], row["_partition"], row["_offset"]) == ("mcp.tool-calls", 3, 42)
    if table == "tool_calls":
        assert row["arguments"] == '{"a":[1],"b":1}'
        assert row["attested"] == '{"sub":"alice"}'
        assert row["extra"] == '{"extra_field":"kept"}'


def test_migrations_parse_into_statements() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})
    first = migrations[0]
    assert all(s.lstrip().upper().startswith("CREATE TABLE") for s in first.statements)
    assert len(first.statements) == 6
    assert split_statements("-- only a comment;\nSELECT 1;\n\n-- x\nSELECT 2") == ["SELECT 1", "SELECT 2"]


def test_a_statement_runs_only_under_the_conditions_before_it() -> None:
    sql = (
        "-- why\n-- only if: SELECT count() = 0 FROM system.tables WHERE database = '{db}'\n"
        "--   ONLY IF:   SELECT 1  \nCREATE TABLE {db}.t (a UInt8)\nENGINE = Log;\n\nDROP TABLE {db}.t;\n"
    )
    assert parse_statements(sql) == [
        Statement(
            "CREATE TABLE {db}.t (a UInt8)\nENGINE = Log",
            ("SELECT count() = 0 FROM system.tables WHERE database = '{db}'", "SELECT 1"),
        ),
        Statement("DROP TABLE {db}.t"),
    ]
    assert split_statements(sql) == ["CREATE TABLE {db}.t (a UInt8)\nENGINE = Log", "DROP TABLE {db}.t"]
    # a condition inside a statement or with no statement after it is an error, not an unconditional statement
    with pytest.raises(ValueError, match="misplaced"):
        parse_statements("SELECT 1\n-- only if: SELECT 0\nFROM t;")
    with pytest.raises(ValueError, match="no statement"):
        parse_statements("SELECT 1;\n-- only if: SELECT 0\n")
    with pytest.raises(ValueError, match="empty"):
        parse_statements("-- only if:\nSELECT 1;")
    # 0010 renames, copies and drops under conditions (it resumes after a kill: tests/integration)
    [lists] = [m for m in load_migrations() if m.version == 10]
    guarded = [s.sql.split()[0] for s in lists.steps if s.only_if]
    assert guarded == ["RENAME", "INSERT", "INSERT", "TRUNCATE", "INSERT", "CREATE", "CREATE"]


def test_query_values_become_json() -> None:
    assert jsonable(datetime(2026, 1, 1, 10, 0, 0, 123000)) == "2026-01-01T10:00:00.123Z"
    assert jsonable((b"x", [1, None])) == ["x", [1, None]]


def test_the_sink_consumer_fetches_wait_in_the_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka's default fetch_min_bytes of 1 made the sink send a fetch request every few
    messages; the consumer waits for SinkConfig.fetch_min_bytes or SCOPEWATCH_SINK_FETCH_WAIT_MS."""
    monkeypatch.delenv("SCOPEWATCH_SINK_CRASH_AT", raising=False)
    config = sink_config(Settings(home=tmp_path, sink_fetch_wait_ms=25, sink_client="aiokafka"))
    assert config.fetch_wait_ms == 25 and config.fetch_min_bytes >= 64 * 1024

    async def build() -> Any:  # aiokafka consumers are made inside a running loop
        return ClickHouseSink(config, writer=None).new_consumer().new()  # type: ignore[arg-type]

    consumer = asyncio.run(build())
    assert (consumer._fetch_min_bytes, consumer._fetch_max_wait_ms) == (config.fetch_min_bytes, 25)
    assert Settings(home=tmp_path).sink_fetch_wait_ms == 100


@pytest.mark.parametrize(("table", "record"), SAMPLES, ids=[s[0] + ":" + type(s[1]).__name__ for s in SAMPLES])
def test_a_record_lands_only_from_its_own_topic(table: str, record: Any, tmp_path: Path) -> None:
    """Each table takes its records only from its topic: the same bytes on another topic are dead-lettered."""
    from aiokafka.structs import ConsumerRecord

    from schemas import encode, topic_for
    from schemas.topics import Topics

    config = sink_config(Settings(home=tmp_path))
    sink = ClickHouseSink(config, writer=None)  # type: ignore[arg-type]  # nothing is flushed here
    value = encode(record)
    own = topic_for(record, Topics())
    other = Topics().grants if own != Topics().grants else Topics().tool_calls
    batch = Batch()
    for offset, topic in enumerate([own, other]):
        sink._absorb_many(batch, [ConsumerRecord(topic, 0, offset, 0, 0, None, value, None, 0, len(value), ())], T)
    topic_at = COLUMNS[table].index("_topic")
    assert [row[topic_at] for row in batch.rows[table]][:1] == [own]  # stored from its own topic
    letter = batch.rows["dead_letters"][-1]  # (a DeadLetter sample is itself the first dead_letters row)
    assert len(batch.rows[table]) == (2 if table == "dead_letters" else 1)
    assert f"WrongTopic: a {getattr(record, 'event_type', type(record).__name__)} does not belong on {other}" in str(
        letter
    )
    assert sink.counters["wrong_topic"] == 1 and sink.counters["dead_letters"] == 1


def test_the_latency_target_sets_each_batch_fill_from_the_recent_flushes() -> None:
    """A row's time in the sink (fetch wait + batch fill + flush) stays near the target: the fill is what is left."""
    assert fill_seconds_for(0.4, 0.5, 0.1, []) == pytest.approx(0.25)  # less the fetch wait and the first fetch
    assert fill_seconds_for(0.4, 0.5, 0.1, [0.02, 0.05, 0.01]) == pytest.approx(0.23)  # the median recent flush
    assert fill_seconds_for(0.4, 0.5, 0.1, [0.02, 0.9, 0.01]) == pytest.approx(0.23)  # one slow flush: no collapse
    assert fill_seconds_for(0.4, 0.2, 0.1, [0.01]) == 0.2  # never beyond batch_seconds
    assert fill_seconds_for(0.4, 0.5, 0.1, [0.9]) == MIN_FILL_SECONDS  # slow flushes: the shortest fill
    assert fill_seconds_for(0.4, 0.01, 0.1, [0.9]) == 0.01  # nor beyond batch_seconds when it is shorter


def test_the_sink_applies_its_latency_target_after_each_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCOPEWATCH_SINK_CRASH_AT", raising=False)
    config = sink_config(Settings(home=tmp_path, sink_batch_seconds=0.5, sink_latency_target=0.4))
    assert config.latency_target == 0.4 and config.fetch_wait_ms == 100
    assert sink_config(Settings(home=tmp_path, sink_latency_target=0)).latency_target is None
    sink = ClickHouseSink(config, writer=None)  # type: ignore[arg-type]
    runner = sink.new_runner(consumer=None)  # type: ignore[arg-type]
    sink.runner = runner
    assert runner.config.fill_seconds == 0.5  # until the first flush
    sink.output.flush_seconds.extend([0.03, 0.08, 0.09])
    sink.flushed({})
    assert runner.config.fill_seconds == pytest.approx(0.17) and sink.counters["fill_ms"] == 170
    sink.output.flush_seconds.extend([0.01] * 8)  # the slow ones have aged out
    sink.flushed({})
    assert runner.config.fill_seconds == pytest.approx(0.24)
    assert runner.config.batch_ms == 50  # the fetch that starts a batch returns soon (librdkafka waits it out)
    untargeted = ClickHouseSink(replace(config, latency_target=None), writer=None)  # type: ignore[arg-type]
    untargeted.runner = untargeted.new_runner(consumer=None)  # type: ignore[arg-type]
    untargeted.output.flush_seconds.append(0.3)
    untargeted.flushed({})
    assert untargeted.runner.config.fill_seconds == 0.5


def test_the_sink_keeps_freed_heap_memory_between_batches(tmp_path: Path) -> None:
    """SINK_MALLOC_KEEP_MB reaches the sink's config; on glibc it is applied with mallopt (in a child process:
    the setting is process-wide), and a batch-sized allocate/free loop then stops faulting pages back in."""
    import subprocess
    import sys

    assert sink_config(Settings(home=tmp_path)).malloc_keep_mb == 256
    assert sink_config(Settings(home=tmp_path, sink_malloc_keep_mb=0)).malloc_keep_mb == 0
    probe = (
        "import resource, sys\n"
        "from stream_jobs.sink import keep_freed_memory\n"
        "assert keep_freed_memory(0) is False\n"
        "keep = sys.argv[1] == 'keep'\n"
        "if keep:\n"
        "    assert keep_freed_memory(256) is True\n"
        "src = [bytearray(1100) for _ in range(30000)]\n"
        "for _ in range(2):  # warm up\n"
        "    msgs = [bytes(b) for b in src]; del msgs\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):  # five batches of 30,000 values of 1,100 bytes, made and freed\n"
        "    msgs = [bytes(b) for b in src]; del msgs\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    runs = {
        mode: subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True)
        for mode in ("keep", "default")
    }
    faults = {mode: int(run.stdout) for mode, run in runs.items()}
    # glibc's defaults hand the ~33 MB back after each batch and fault ~8,000 pages in again per batch
    assert faults["default"] > 20_000, faults
    assert faults["keep"] < 1_000, faults
