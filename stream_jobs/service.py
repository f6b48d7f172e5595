"""Process entry points for the stream jobs: the ClickHouse sink service (with the SQL endpoint)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stream_jobs import metrics
from stream_jobs.clickhouse import ClickHouseError, chdb_path, check_tables, connect, migrate
from stream_jobs.query_server import AnalystSession, QueryServer, query_caps, write_token
from stream_jobs.runtime.files import atomic_write, process_start_time
from stream_jobs.runtime.lifecycle import kafka_or_exit, service_logging, stop_on_signals
from stream_jobs.runtime.settings import Settings
from stream_jobs.sink import ClickHouseSink, ClickHouseWriter, SinkConfig
from stream_jobs.tables import SPECS, table_topics
from stream_jobs.trace import TRACE

SpoolReader = Callable[[], Sequence[metrics.SpoolFigures]]

log = logging.getLogger("scopewatch.sink")


def sink_topics(settings: Settings) -> list[str]:
    """Every table's topic (:data:`stream_jobs.tables.SPECS`), in the order of the specs."""
    return list(dict.fromkeys(table_topics(settings.topics, SPECS).values()))


def query_endpoint_file(settings: Settings) -> Path:
    return settings.run_dir / "query.json"


def query_token_file(settings: Settings) -> Path:
    return settings.run_dir / "query-token"


def _write_json(path: Path, data: dict[str, object]) -> None:
    atomic_write(path, json.dumps(data, indent=1))


async def _connect_owner(settings: Settings, patience: float = 15.0) -> Any:
    """Open the store the sink will own, waiting briefly while another process holds its folder.

    A sink that crashed leaves its ``query.json`` behind; until the new sink has written its own,
    a ``scopewatch sql`` one-shot opens the chDB folder directly for a moment. The new sink waits
    that out instead of dying with "in use" (a sink left running elsewhere still fails, after
    ``patience`` seconds).
    """
    password = settings.clickhouse_password.get_secret_value()
    deadline = time.monotonic() + patience
    while True:
        try:
            return connect(settings.dsn, password=password, user=settings.clickhouse_user)
        except ClickHouseError as exc:
            if "in use" not in str(exc) or time.monotonic() > deadline:
                raise
            log.warning("%s; retrying", exc)
            await asyncio.sleep(0.5)


def sink_config(settings: Settings) -> SinkConfig:
    """The sink's configuration from the settings (and the crash-drill variables)."""
    return SinkConfig(
        bootstrap=settings.kafka_bootstrap,
        topics=sink_topics(settings),
        group=settings.sink_group,
        batch_rows=settings.sink_batch_rows,
        batch_seconds=settings.sink_batch_seconds,
        fetch_wait_ms=settings.sink_fetch_wait_ms,
        latency_target=settings.sink_latency_target or None,
        malloc_keep_mb=settings.sink_malloc_keep_mb,
        bulk_avro=settings.sink_bulk_avro,
        client=settings.sink_client,
        intent_file=settings.run_dir / "sink-intent.json",
        crash_at=os.environ.get("SCOPEWATCH_SINK_CRASH_AT") or None,
        crash_batch=int(os.environ.get("SCOPEWATCH_SINK_CRASH_BATCH", "1")),
        table_topics=table_topics(settings.topics),
        raw_seconds=settings.sink_raw_seconds,
        backlog_rows=settings.sink_backlog_rows,
        backlog_seconds=settings.sink_backlog_seconds,
        backlog_idle_ms=max(500, 5 * settings.sink_fetch_wait_ms),
        fast_topics=frozenset({settings.topics.evidence}),
    )


async def _sink_main(settings: Settings, spools: SpoolReader) -> None:
    client = await _connect_owner(settings)
    applied = migrate(client, settings.clickhouse_database)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    check_tables(client, settings.clickhouse_database)
    fault = os.environ.get("SCOPEWATCH_SINK_FAULT_FILE")
    writer = ClickHouseWriter(
        client, settings.clickhouse_database, fault_file=Path(fault) if fault else None, decoder=settings.sink_decoder
    )
    server: QueryServer | None = None
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    if settings.embedded:
        path = chdb_path(client)
        if path is None:  # pragma: no cover - an embedded store always has a folder here
            raise ClickHouseError("the embedded ClickHouse has no data folder")
        session = AnalystSession(path, query_caps(settings))
        token = write_token(query_token_file(settings))
        server = QueryServer(session, token, settings.query_port)
        await server.start()
        _write_json(
            query_endpoint_file(settings),
            {"port": settings.query_port, "pid": os.getpid(), "start_ticks": process_start_time(os.getpid())},
        )
    sink = ClickHouseSink(sink_config(settings), writer)
    stop_on_signals(sink.stop, settings.stop_seconds, "sink")

    recorder = metrics.MetricsReporter(writer, settings.run_dir, spools, metrics.instance_name())

    async def report() -> None:
        stats = settings.run_dir / "sink-stats.json"
        while True:
            counts = sink.stats()
            _write_json(stats, {"at": time.time(), **counts, **recorder.counters()})
            await recorder.tick(counts)
            await asyncio.sleep(2.0)

    reporter = asyncio.create_task(report())
    try:
        await sink.run()
    finally:
        reporter.cancel()
        if server is not None:
            await server.stop()
            query_endpoint_file(settings).unlink(missing_ok=True)
            server.session.close()
        log.info(
            "sink stopped: %s", ", ".join(f"{k}={v}" for k, v in sorted(sink.counters.items())) or "nothing written"
        )


def run_sink_service(settings: Settings, spools: SpoolReader = tuple) -> None:
    """Run the sink; ``spools`` returns the figures of the collectors' spools on this host (the CLI
    passes :func:`scopewatch.spools.reader`; the services do not read the collectors' files)."""
    service_logging(logging.INFO)
    TRACE.configure(settings.trace_dir, settings.trace_role)
    kafka_or_exit(settings.kafka_bootstrap, "sink", settings.kafka_wait_seconds)
    asyncio.run(_sink_main(settings, spools))
