"""The decision stream job (faust-streaming), built by :func:`create_app`.

Two agents, each over a pair of co-partitioned topics, run the pure processors of
``detections.live`` and send what they return:

* ``attribute`` (stage 1) reads ``mcp.tool-calls`` and ``identity.sessions`` (key: session_id).
  Its tables hold session histories and open calls; it forwards each call, with its attribution,
  to the internal topic ``scopewatch.calls-by-route`` keyed by the call's route (delegation key,
  or the session route when the session names nobody).
* ``authorize`` (stage 2) reads ``scopewatch.calls-by-route`` and ``consent.grants`` (key: the
  delegation key). Its tables hold grant histories and the calls it owns; every verdict version
  goes to ``audit.evidence``.

Faust assigns topics with the same partition count and the same subscribers together, so
partition p of both inputs of an agent, and of its tables' changelogs, live on one worker. The
internal topic is written with the partition Kafka's default partitioner (murmur2) gives the key,
which is how the grants topic is keyed by its producers. A timer sends a tick to each assigned
partition of the internal topic so idle partitions still finalize calls at their deadline.

Agents only decode, call the core and emit. Raw bytes are decoded with our own Avro codec (not
``faust.Record``); an event that does not decode, is of the wrong type or makes the core fail
goes to the dead-letter topic with the reason, and is counted. Agents run with
``concurrency=1`` (faust-streaming#606), at-least-once: outputs are sent before the input offset
is committed, and the core ignores redelivered events (evidence ids are deterministic).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections import Counter
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime
from typing import Any

import faust
from aiokafka.partitioner import murmur2

from detections.live import LiveCounters, Output, Stage1, Stage2, tick_message
from schemas import (
    CodecError,
    GrantIssued,
    GrantRevoked,
    SessionBound,
    SessionEnded,
    ToolCall,
    decode,
    encode,
)
from scopewatch.settings import Settings
from scopewatch.stack.proc import atomic_write
from stream_jobs.dead_letters import dead_letter_for

log = logging.getLogger("scopewatch.stream")


def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2, as the Java client and aiokafka use)."""
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


class TableView(MutableMapping[str, bytes]):
    """A Faust table of bytes -> bytes seen as str -> bytes (raw keys come back as bytes on recovery)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __getitem__(self, key: str) -> bytes:
        value: bytes = self.table[key.encode("utf-8")]
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self.table.get(key.encode("utf-8"), default)

    def __setitem__(self, key: str, value: bytes) -> None:
        self.table[key.encode("utf-8")] = value

    def __delitem__(self, key: str) -> None:
        del self.table[key.encode("utf-8")]

    def __iter__(self) -> Iterator[str]:
        for key in list(self.table.keys()):
            yield key.decode("utf-8") if isinstance(key, bytes) else key

    def __len__(self) -> int:
        return len(self.table)


def create_app(settings: Settings, *, app_id: str | None = None) -> faust.App:
    """A fresh Faust app for one worker process (never shared at module level)."""
    topics = settings.topics
    config = settings.live_config
    n = settings.partitions
    app = faust.App(
        app_id or settings.worker_group,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        datadir=str(settings.home / "faust"),
        web_enabled=False,
        topic_partitions=n,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        table_standby_replicas=0,
    )
    counters: Counter[str] = Counter()
    live_counters = LiveCounters()
    app.scopewatch_counters = counters  # type: ignore[attr-defined]
    app.scopewatch_live_counters = live_counters  # type: ignore[attr-defined]

    def raw_topic(*names: str) -> Any:
        return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    def table(name: str) -> Any:
        return app.Table(
            name,
            default=None,
            partitions=n,
            key_type=bytes,
            value_type=bytes,
        )

    stage1_in = raw_topic(topics.tool_calls, topics.sessions)
    stage2_in = raw_topic(topics.calls_by_route, topics.grants)
    routed_topic = raw_topic(topics.calls_by_route)
    evidence_topic = raw_topic(topics.evidence)
    findings_topic = raw_topic(topics.findings)
    dead_letter_topic = raw_topic(topics.dead_letter)

    s1_sessions, s1_calls = TableView(table("s1-sessions")), TableView(table("s1-calls"))
    s2_grants, s2_calls = TableView(table("s2-grants")), TableView(table("s2-calls"))
    stage1: dict[int, Stage1] = {}
    stage2: dict[int, Stage2] = {}

    def stage1_for(partition: int) -> Stage1:
        proc = stage1.get(partition)
        if proc is None:
            proc = stage1[partition] = Stage1(partition, s1_sessions, s1_calls, config, live_counters)
            proc.rebuild()
        return proc

    def stage2_for(partition: int) -> Stage2:
        proc = stage2.get(partition)
        if proc is None:
            proc = stage2[partition] = Stage2(partition, s2_grants, s2_calls, config, live_counters)
            proc.rebuild()
        return proc

    # After a rebalance the tables hold what recovery gave: indexes are rebuilt lazily from them.
    s1_calls.table.on_recover(_clearer(stage1))
    s2_calls.table.on_recover(_clearer(stage2))

    async def emit(out: Output) -> None:
        for fwd in out.forwards:
            key = fwd.route.encode("utf-8")
            await routed_topic.send(key=key, value=fwd.payload, partition=partition_for(key, n))
        for evidence in out.evidence:
            await evidence_topic.send(key=evidence.call_id.encode("utf-8"), value=encode(evidence))
            counters[f"evidence_{evidence.verdict}"] += 1
        for finding in out.findings:
            # keyed by dedup key: one pager partition sees every finding of a dedup key
            await findings_topic.send(key=finding.dedup_key.encode("utf-8"), value=encode(finding))
            counters["findings"] += 1

    async def dead_letter(event: Any, stage: str, exc: Exception, now: datetime) -> None:
        counters["dead_letters"] += 1
        counters[f"dead_letters_{stage}"] += 1
        m = event.message
        record = dead_letter_for(
            m.topic, m.partition, m.offset, m.key, m.value, stage, f"{type(exc).__name__}: {exc}", now
        )
        await dead_letter_topic.send(key=m.key, value=encode(record))
        log.warning("dead-lettered %s[%s]@%s: %s", m.topic, m.partition, m.offset, record.reason)

    @app.agent(stage1_in, concurrency=1, name="attribute")
    async def attribute_agent(stream: Any) -> None:
        async for event in stream.events():
            now = datetime.now(UTC)
            m = event.message
            try:
                obj = decode(m.value)
                proc = stage1_for(m.partition)
                if m.topic == topics.tool_calls and isinstance(obj, ToolCall):
                    out = proc.on_call(obj, now)
                elif m.topic == topics.sessions and isinstance(obj, (SessionBound, SessionEnded)):
                    out = proc.on_fact(obj, now)
                else:
                    raise CodecError(f"unexpected {type(obj).__name__} on {m.topic}")
            except Exception as exc:  # noqa: BLE001 - every bad event is dead-lettered, never fatal
                await dead_letter(event, "attribute", exc, now)
                continue
            counters["stage1_events"] += 1
            await emit(out)

    @app.agent(stage2_in, concurrency=1, name="authorize")
    async def authorize_agent(stream: Any) -> None:
        async for event in stream.events():
            now = datetime.now(UTC)
            m = event.message
            try:
                proc = stage2_for(m.partition)
                if m.topic == topics.calls_by_route:
                    out = proc.on_message((m.key or b"").decode("utf-8"), m.value, now)
                else:
                    obj = decode(m.value)
                    if not isinstance(obj, (GrantIssued, GrantRevoked)):
                        raise CodecError(f"unexpected {type(obj).__name__} on {m.topic}")
                    out = proc.on_fact(obj, now)
            except Exception as exc:  # noqa: BLE001
                await dead_letter(event, "authorize", exc, now)
                continue
            counters["stage2_events"] += 1
            await emit(out)

    @app.timer(interval=settings.tick_seconds)  # type: ignore[untyped-decorator]
    async def tick() -> None:
        for tp in app.consumer.assignment():
            if tp.topic == topics.calls_by_route:
                await routed_topic.send(key=b"", value=tick_message(), partition=tp.partition)

    @app.task  # type: ignore[untyped-decorator]
    async def quiet_kafka_client() -> None:
        # Runs once the worker has set up logging, which leaves aiokafka at DEBUG: about ten log
        # records per call, a tenth of the worker's time (bench/profile_decisions.py).
        logging.getLogger("aiokafka").setLevel(logging.WARNING)

    stats_file = settings.run_dir / f"worker-{socket.gethostname()}-{os.getpid()}.json"

    @app.timer(interval=max(settings.tick_seconds, 1.0))  # type: ignore[untyped-decorator]
    async def write_stats() -> None:
        data = {
            "pid": os.getpid(),
            "updated_at": datetime.now(UTC).isoformat(),
            "counters": dict(counters) | live_counters.counts,
            "open_calls_stage1": sum(p.open_calls() for p in stage1.values()),
            "open_calls_stage2": sum(p.open_calls() for p in stage2.values()),
        }
        try:
            atomic_write(stats_file, json.dumps(data, indent=1, sort_keys=True))
        except OSError as exc:  # stats are best effort; never stop the job
            log.warning("cannot write %s: %s", stats_file, exc)

    return app


def _clearer(processors: dict[int, Any]) -> Any:
    async def on_recover() -> None:
        processors.clear()

    return on_recover


def run_worker(settings: Settings, loglevel: str = "WARNING") -> None:
    """Run one decision worker until it is stopped (SIGTERM/SIGINT)."""
    from faust.worker import Worker

    app = create_app(settings)
    worker = Worker(app, loglevel=loglevel, quiet=True, workdir=str(settings.home))
    worker.execute_from_commandline()
