"""The decision stream job (faust-streaming), built by :func:`create_app`.

Agents here only decode, call the pure core in ``detections`` and emit. Raw bytes are
decoded with our own Avro codec (not ``faust.Record``); an event that does not decode
or is of the wrong type goes to the dead-letter topic with the reason, and is counted.
Agents run with ``concurrency=1`` (faust-streaming#606) and at-least-once semantics.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import faust

from detections.placeholder import placeholder_evidence
from schemas import CodecError, ToolCall, decode, encode
from scopewatch.settings import Settings
from stream_jobs.dead_letters import dead_letter_for

log = logging.getLogger("scopewatch.stream")


def create_app(settings: Settings, *, app_id: str | None = None) -> faust.App:
    """A fresh Faust app for one worker process (never shared at module level)."""
    topics = settings.topics
    app = faust.App(
        app_id or settings.worker_group,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        datadir=str(settings.home / "faust"),
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
    )
    counters: Counter[str] = Counter()
    app.scopewatch_counters = counters  # type: ignore[attr-defined]

    def raw_topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    calls_topic = raw_topic(topics.tool_calls)
    evidence_topic = raw_topic(topics.evidence)
    dead_letter_topic = raw_topic(topics.dead_letter)

    @app.agent(calls_topic, concurrency=1, name="decide")
    async def decide(stream: Any) -> None:
        async for event in stream.events():
            now = datetime.now(UTC)
            try:
                call = decode(event.value)
                if not isinstance(call, ToolCall):
                    raise CodecError(f"expected a tool_call on {event.message.topic}, got {type(call).__name__}")
                evidence = placeholder_evidence(call, decided_at=now, evidence_id=str(uuid.uuid4()))
            except Exception as exc:  # noqa: BLE001 - every bad event is dead-lettered, never fatal
                counters["dead_letters"] += 1
                m = event.message
                record = dead_letter_for(
                    m.topic, m.partition, m.offset, m.key, m.value, "decide", f"{type(exc).__name__}: {exc}", now
                )
                await dead_letter_topic.send(key=event.message.key, value=encode(record))
                log.warning(
                    "dead-lettered %s[%s]@%s: %s",
                    event.message.topic,
                    event.message.partition,
                    event.message.offset,
                    record.reason,
                )
                continue
            counters["decided"] += 1
            await evidence_topic.send(key=call.call_id.encode("utf-8"), value=encode(evidence))

    return app


def run_worker(settings: Settings, loglevel: str = "WARNING") -> None:
    """Run one decision worker until it is stopped (SIGTERM/SIGINT)."""
    from faust.worker import Worker

    app = create_app(settings)
    worker = Worker(app, loglevel=loglevel, quiet=True, workdir=str(settings.home))
    worker.execute_from_commandline()
