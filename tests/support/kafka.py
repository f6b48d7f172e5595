"""Reading topics back in tests: a consumer from the beginning, outside any group."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer

from stream_jobs.runtime.settings import Settings


def reader(settings: Settings, *topics: str) -> AIOKafkaConsumer:
    """Not started: ``await consumer.start()``. Defaults to the call, result and session topics."""
    t = settings.topics
    return AIOKafkaConsumer(
        *(topics or (t.tool_calls, t.tool_results, t.sessions)),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
